"""Records and manifests: read CSV / JSONL / Parquet manifests, class folders and `save_to_disk` folders
into plain dicts, detect columns, and assign splits.

A record is a dict with the canonical keys `id, row, text, image, audio, label, target, split`; media
values are absolute paths, raw bytes, or None when the record lacks that modality.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, BinaryIO
from collections.abc import Callable, Iterable, Iterator

from mmllm import modalities, tasks
from mmllm.errors import RecordError, UserError, utf8_text

# column names auto-detected per canonical key (a modality's come from its plug-in: candidates())
CANDIDATES = {
    "id": ["id", "record_id", "uid", "key"],
    "text": ["text", "sentence", "caption", "prompt", "question", "context", "description", "utterance"],
    "label": ["label", "labels", "class", "category", "y", "intent", "topic", "sentiment", "emotion", "genre",
              "class_label", "label_name"],
    "target": ["target", "answer", "response", "output", "summary", "target_text"],
    "split": ["split", "subset", "fold"],
}
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
JSONL_EXT = (".jsonl", ".ndjson", ".json")
MB = 1 << 20
MAX_LINE_MB = 16  # default longest JSON line (predict: --max-line-mb)
JSON_SPACE = b" \t\r\n"  # a JSONL line of only these is blank (JSON's own whitespace)
SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, always a lone one (JSON's "\ud800"): not encodable as UTF-8


def candidates() -> dict[str, list[str]]:
    """Column names auto-detected per canonical key: id, text, each modality's (its plug-in's), label, target,
    split."""
    media = {m.name: list(m.columns) for m in modalities.all()}
    return {"id": CANDIDATES["id"], "text": CANDIDATES["text"], **media,
            **{k: v for k, v in CANDIDATES.items() if k not in ("id", "text")}}


def keys() -> tuple[str, ...]:
    """The canonical keys of a record."""
    return tuple(candidates())


def read_table(path: Path, max_line_mb: float = MAX_LINE_MB) -> tuple[list[str], Iterator[tuple[int, Any]]]:
    """Column names and an iterator of (row number, row dict or RecordError) of a manifest file."""
    _check_manifest(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read Parquet manifest {path}: {str(e).splitlines()[0]}") from None
        return table.column_names, ((i + 1, r) for i, r in enumerate(table.to_pylist()))
    if suffix in JSONL_EXT:
        return _jsonl_rows(path, max_line_mb)
    text = utf8_text(path.read_bytes(), str(path))
    if suffix in (".csv", ".tsv", ".txt"):
        # newline="": lines end at \n, \r\n or a lone \r (old Mac files), as the csv module expects
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if not columns:
            raise UserError(f"{path} is empty: expected a header row")
        _check_unique(columns, path)
        return columns, _csv_rows(reader, columns)
    raise UserError(f"{path}: unsupported manifest type '{suffix}' (use .csv, .tsv, .jsonl or .parquet)")


def _check_manifest(path: Path) -> None:
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder; expected a manifest file")


def _check_unique(columns: list[str], path: Path) -> None:
    """A header naming a column twice would leave all but the last unread: refused, naming it. (Unnamed columns,
    as trailing commas make, are no role's and stay allowed.)"""
    first: dict[str, int] = {}
    for i, name in enumerate(columns, start=1):
        if name in first and name:
            raise UserError(f"{path}: column '{name}' appears twice in the header (columns {first[name]} and {i}): "
                            "rename one")
        first[name] = i


def _csv_rows(reader: csv.DictReader, columns: list[str]) -> Iterator[tuple[int, dict | RecordError]]:
    """Rows of a CSV reader; a row the csv module rejects (e.g. a field over its size limit) is that row's error."""
    i = 1  # row 1 is the header
    while True:
        i += 1
        try:
            r = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield i, RecordError(None, f"unreadable CSV row ({e})")
            continue
        if None in r:
            yield i, RecordError(None, f"{len(r[None]) + len(columns)} fields, header has {len(columns)}")
            continue
        yield i, {k.strip(): v for k, v in r.items()}


def _jsonl_rows(path: Path, max_line_mb: float) -> tuple[list[str], Iterator]:
    columns: dict[str, None] = {}
    parsed = json_array_rows(path)
    if parsed is None:
        with open(path, "rb") as f:
            parsed = list(json_lines(f, max_line_mb))
    for _, obj in parsed:
        if isinstance(obj, dict):
            columns.update(dict.fromkeys(obj))
    if not parsed:
        raise UserError(f"{path} is empty: no records")
    return list(columns), iter(parsed)


def json_lines(stream: BinaryIO, max_line_mb: float = MAX_LINE_MB) -> Iterator[tuple[int, dict | RecordError]]:
    """(line number, object or RecordError) of each non-blank line of a JSONL byte stream. Memory stays bounded
    by the line limit: a longer line is skipped unread; any failure to parse a line is that line's error."""
    limit = max(1, int(max_line_mb * MB))
    for i, line in enumerate(_bounded_lines(stream, limit), start=1):
        if line is None:
            yield i, RecordError(None, f"line longer than {max_line_mb:g} MB (--max-line-mb): not parsed")
            continue
        if i == 1:
            line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte order mark
        if line.strip(JSON_SPACE):
            yield i, parse_json_line(line)


def _bounded_lines(stream: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """Lines of at most `limit` bytes (newline excluded); None for a longer line, whose rest is read and dropped
    in 1 MB pieces."""
    while line := stream.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            del line
            while (rest := stream.readline(MB)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def parse_json_line(line: bytes) -> dict | RecordError:
    """One JSONL line -> its object, or a RecordError saying why not (never raises)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RecordError(None, f"not UTF-8 (invalid byte 0x{line[e.start]:02x} at byte {e.start + 1}): "
                                 "re-save it as UTF-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return RecordError(None, f"malformed JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return RecordError(None, "JSON nested too deeply to read")
    except Exception as e:  # noqa: BLE001 - e.g. an integer of more than 4300 digits
        return RecordError(None, f"cannot parse JSON ({type(e).__name__}: {str(e)[:120]})")
    if not isinstance(obj, dict):
        return RecordError(None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


class ColumnMap(dict):
    """Canonical key -> column name or None (a plain dict to JSON), and `ignored`: the input's columns that
    have no role, in input order."""

    ignored: list[str] = []


def detect_columns(columns: list[str], given: dict[str, str | None]) -> ColumnMap:
    """Map canonical keys to column names: given flags win (and must exist), else the first candidate found."""
    lower = {c.lower(): c for c in columns}
    out = ColumnMap()
    missing = []
    for key, names in candidates().items():
        flag_value = given.get(key)
        if flag_value:
            if flag_value not in columns:
                missing.append(f"--{key}-column: no column '{flag_value}' (columns: {', '.join(columns)})")
            out[key] = flag_value
        else:
            out[key] = next((lower[c] for c in names if c in lower), None)
    if missing:
        raise UserError("; ".join(missing))
    if not any(out[k] for k in modalities.input_roles()):
        raise UserError(f"no {modalities.spelled(modalities.input_roles())} column found (columns: "
                        f"{', '.join(columns)}); name them with "
                        f"{' / '.join(f'--{k}-column' for k in modalities.input_roles())}")
    used = set(out.values())
    out.ignored = [c for c in columns if c not in used]
    return out


def local_path(value: str, base: Path) -> str:
    """A media path as the local commands read it: `~` expanded, relative to `base` unless absolute."""
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p))


MediaPath = Callable[[str, Path], str]  # (cell text, base) -> path to read, or RecordError (serve: --media-root)


def _media(value: Any, base: Path, media_path: MediaPath = local_path) -> Any:
    """A media cell -> path string (`media_path` of the cell), raw bytes, or None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, dict):  # datasets Image/Audio-like {"bytes": ..., "path": ...}; text in either is a path
        return _media(value.get("bytes") or value.get("path"), base, media_path)
    if isinstance(value, (bytes, bytearray)):
        if not value:  # an empty upload, b"" or an empty base64 string: no input, not a missing one
            raise RecordError(None, "empty file (0 bytes)")
        return bytes(value)
    if hasattr(value, "save"):  # a PIL image from a datasets folder
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    s = str(value).strip()
    return media_path(s, base) if s else None


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value


def check_unicode(value: Any, column: str | None) -> None:
    """A text with a lone surrogate (valid JSON: "\\ud800", but no character) is that record's error."""
    if isinstance(value, str) and (bad := SURROGATE.search(value)):
        raise RecordError(column, f"lone surrogate U+{ord(bad.group()):04X} at character {bad.start() + 1} is not a "
                                  "character (no UTF-8 for it): fix the text")


def replace_surrogates(value: str) -> str:
    """`value` with each lone surrogate replaced by U+FFFD (an id that can still be printed)."""
    return SURROGATE.sub("\ufffd", value)


def to_record(raw: dict, row: int, cols: dict[str, str | None], base: Path,
              media_path: MediaPath = local_path) -> dict:
    rec: dict[str, Any] = {"row": row}
    media = modalities.names()
    for key in keys():
        col = cols.get(key)
        value = raw.get(col) if col else None
        check_unicode(value, col)
        if key in media:
            try:
                rec[key] = _media(value, base, media_path)
            except RecordError as e:
                raise RecordError(e.column or col, e.reason) from None
        elif key == "split":
            s = _cell(value)
            rec[key] = SPLIT_NAMES.get(str(s).strip().lower(), str(s).strip().lower()) if s not in (None, "") else None
        else:
            if key == "id" and isinstance(value, float) and not math.isfinite(value):  # NaN would pass as missing
                raise RecordError(col, f"id is {'NaN' if value != value else value}, not a usable id: give a finite "
                                       "number or a text")
            v = _cell(value)
            if key == "text" and v is not None and not isinstance(v, str):
                if isinstance(v, (dict, list)):
                    raise RecordError(col, f"expected text, got a JSON {type(v).__name__}")
                v = str(v)
            if key in ("label", "id") and v is not None:
                if isinstance(v, (dict, list)):
                    raise RecordError(col, f"expected a scalar, got a JSON {type(v).__name__}")
                v = str(v).strip()
            rec[key] = v
    if rec["id"] in (None, ""):
        rec["id"] = f"row{row}"
    if isinstance(raw.get("conversation"), str) and raw.get(FLAT):  # conversations.flatten's turns
        rec["conversation"] = raw["conversation"]
    elif isinstance(rec.get("text"), str):
        _one_placeholder_each(rec["text"], cols.get("text"))
    return rec


def _one_placeholder_each(text: str, column: str | None) -> None:
    """A flat record has at most one item of each medium, so at most one of its placeholders (`<image>`) says where
    it stands; more are a RecordError (conversation formats list several items, one placeholder each)."""
    from mmllm.conversations import LISTS, PLACEHOLDERS

    for m, tag in PLACEHOLDERS.items():
        if (n := text.count(tag)) > 1:
            raise RecordError(column, f"{n} {tag} placeholders in the text, and a record of this form has one {m}: "
                                      f"give several {m}s as a conversation (ShareGPT's '{LISTS[m]}' list)")


def checked_record(raw: dict, row: int, cols: dict[str, str | None], base: Path,
                   media_path: MediaPath = local_path) -> dict:
    """to_record, with any failure (a RecursionError on a deeply nested cell, anything) as a RecordError."""
    try:
        return to_record(raw, row, cols, base, media_path)
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 - one record's failure is that record's error
        raise RecordError(None, f"unreadable record ({type(e).__name__}: {str(e)[:120]})") from None


def given_id(raw: dict, column: str | None, row: int) -> Any:
    """The record's id exactly as given (a JSON scalar; a lone surrogate in it as U+FFFD), or `rowN` when it has
    none usable."""
    v = raw.get(column) if column else None
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return f"row{row}"
    if isinstance(v, str):
        return replace_surrogates(v)
    if isinstance(v, (int, float)):  # bool is an int
        return v
    if isinstance(v, (dict, list, tuple)):
        return f"row{row}"
    return str(v)


def bad_id(e: RecordError, row: int) -> Any:
    """The id of a record that failed as a whole: its own when it was read, else `rowN`."""
    return f"row{row}" if e.record_id is None or e.record_id == "row0" else e.record_id


def read_records(source: str, given_columns: dict[str, str | None]) -> tuple[list[dict], list[dict], dict]:
    """(records, errors, column map) of a manifest file, a class folder or a `save_to_disk` folder."""
    path = Path(source).expanduser()
    if is_saved_dataset(path):
        return _read_saved_dataset(path, given_columns)
    if path.is_dir():
        return _read_class_folder(path)
    columns, rows = read_table(path)
    columns, rows = conversation_rows(columns, rows)
    cols = detect_columns(columns, given_columns)
    records, errors = [], []
    for row, raw in rows:
        if isinstance(raw, RecordError):
            errors.append(error_entry({"id": bad_id(raw, row), "row": row}, raw))
            continue
        try:
            records.append(checked_record(raw, row, cols, path.parent))
        except RecordError as e:
            errors.append(error_entry({"id": given_id(raw, cols["id"], row), "row": row}, e))
    return records, errors, cols


def _read_class_folder(path: Path) -> tuple[list[dict], list[dict], dict]:
    path = path.absolute()  # media paths are absolute: a relative folder is never joined onto itself (predict, eval)
    records = []
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{path}: expected a manifest file or a folder of class subfolders")
    for cls in classes:
        for f in sorted(cls.rglob("*")):
            ext = f.suffix.lower()
            role = modalities.by_extension(ext)
            if role is None or f.is_dir():  # a pipe, a device or a broken link named as media: its own skip line
                continue
            rec = {k: None for k in keys()}
            rec.update(id=f.relative_to(path).as_posix(), row=len(records) + 1, label=cls.name)
            rec[role] = str(f)
            records.append(rec)
    if not records:
        raise UserError(f"{path}: no {modalities.spelled(modalities.inputs())} files in its class subfolders")
    cols = {k: None for k in keys()}
    cols.update({m: m for m in modalities.names() if any(r[m] for r in records)}, label="label")
    return records, [], cols


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists())


def saved_parts(path: Path) -> list[tuple[str | None, Any]]:
    """(split name or None, Dataset) of a `save_to_disk` folder."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    return list(ds.items()) if isinstance(ds, datasets.DatasetDict) else [(None, ds)]


def named_rows(part: Any) -> Iterator[dict]:
    """The rows of a Dataset with `ClassLabel` ids replaced by their names (None stays None: unlabeled)."""
    import datasets

    classes = {c: f for c, f in part.features.items() if isinstance(f, datasets.ClassLabel)}
    for raw in part:
        yield {**raw, **{c: f.int2str(raw[c]) for c, f in classes.items()
                         if isinstance(raw[c], int) and raw[c] >= 0}} if classes else raw


def _read_saved_dataset(path: Path, given: dict) -> tuple[list[dict], list[dict], dict]:
    records, errors, cols = [], [], {}
    for split, part in saved_parts(path):
        cols = detect_columns(part.column_names, given)
        for i, raw in enumerate(named_rows(part), start=1):
            try:
                rec = checked_record(raw, len(records) + 1, cols, path)
            except RecordError as e:
                errors.append(error_entry({"id": f"row{i}", "row": i}, e))
                continue
            if split and not rec["split"]:
                rec["split"] = SPLIT_NAMES.get(split, split)
            records.append(rec)
    if any(r["split"] for r in records):
        cols["split"] = cols.get("split") or "split"
    return records, errors, cols


def error_entry(rec: dict, e: RecordError | Exception, column: str | None = None, file: str | None = None) -> dict:
    """The report entry of a skipped record."""
    return {"id": rec.get("id"), "row": rec.get("row"), "column": getattr(e, "column", None) or column,
            "file": getattr(e, "file", None) or file, "reason": getattr(e, "reason", None) or str(e)}


def format_error(entry: dict) -> str:
    where = [f"record {entry['id']}"]
    if entry.get("row") is not None:
        where.append(f"row {entry['row']}")
    if entry.get("column"):
        where.append(f"column {entry['column']}")
    return f"{', '.join(where)}: {entry['reason']}"


def assign_splits(records: list[dict], val_fraction: float, test_fraction: float, seed: int) -> None:
    """Seeded, stratified by label: records without a split get train / validation / test.

    Split sizes are taken over all these records (round(N * fraction)) and shared out among the labels by
    largest remainder, so many small classes do not each round down to none. A split with a fraction > 0 is
    never empty while one record is left for training (validation is served before test), and a label keeps
    one training record unless no other label can give one."""
    todo = [r for r in records if not r.get("split")]
    groups: dict[Any, list[dict]] = defaultdict(list)
    for r in todo:
        groups[r.get("label")].append(r)
    rng = random.Random(seed)
    keys = sorted(groups, key=lambda k: (k is None, str(k)))
    for key in keys:
        rng.shuffle(groups[key])
    tie = [rng.random() for _ in keys]  # seeded order among labels with equal claims
    sizes = [len(groups[k]) for k in keys]
    n = len(todo)
    n_val = min(max(round(n * val_fraction), int(val_fraction > 0)), max(n - 1, 0))
    n_test = min(max(round(n * test_fraction), int(test_fraction > 0)), max(n - 1 - n_val, 0))
    val = _share(n_val, [s * val_fraction for s in sizes], sizes, tie)
    test = _share(n_test, [s * test_fraction for s in sizes], [s - v for s, v in zip(sizes, val)], tie)
    for key, v, t in zip(keys, val, test):
        for i, r in enumerate(groups[key]):
            r["split"] = "validation" if i < v else "test" if i < v + t else "train"


def _share(total: int, exact: list[float], room: list[int], tie: list[float]) -> list[int]:
    """`total` records shared among groups: the floor of each group's `exact` share, then one more each to
    the largest remainders; a group gives its last record (of `room`) only when no other group can."""
    counts = [min(int(e), max(r - 1, 0)) for e, r in zip(exact, room)]
    given = sum(counts)
    order = sorted(range(len(counts)), key=lambda i: (counts[i] - exact[i], -room[i], tie[i]))
    for keep in (1, 0):
        for i in order:
            if given >= total:
                return counts
            if counts[i] < room[i] - keep:
                counts[i] += 1
                given += 1
    return counts


# ---------------------------------------------------------------- raw records for eval / predict

def input_rows(source: str, max_line_mb: float = MAX_LINE_MB) -> tuple[Iterator[tuple[int, Any]], Path]:
    """(rows, folder that relative media paths start from) of `-` (JSONL on stdin), a manifest, or a folder of
    class subfolders or a `save_to_disk` folder (the inputs prepare takes); JSONL is streamed line by line, with
    each line bounded by `max_line_mb`."""
    if source == "-":
        stdin = getattr(sys.stdin, "buffer", None) or io.BytesIO(sys.stdin.read().encode("utf-8"))
        return json_lines(stdin, max_line_mb), Path.cwd()
    path = Path(source)
    if path.is_dir():
        return folder_rows(path), path
    if path.suffix.lower() in JSONL_EXT:
        _check_manifest(path)

        def streamed() -> Iterator[tuple[int, Any]]:
            whole = json_array_rows(path)
            if whole is not None:
                yield from whole
                return
            with open(path, "rb") as f:
                yield from json_lines(f, max_line_mb)
        return streamed(), path.parent
    return read_table(path, max_line_mb)[1], path.parent


def folder_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, raw dict) of a folder, read as prepare reads it: a `save_to_disk` dataset (each row gets its
    split's name), or class subfolders (id: the file's path in the folder, label: its subfolder's name)."""
    if not is_saved_dataset(path):
        records = _read_class_folder(path)[0]
        return ((r["row"], {k: r[k] for k in ("id", *modalities.names(), "label") if r[k] is not None})
                for r in records)

    def saved() -> Iterator[tuple[int, Any]]:
        row = 0
        for split, part in saved_parts(path):
            for raw in named_rows(part):
                row += 1
                if split and "split" not in raw:
                    raw = {**raw, "split": SPLIT_NAMES.get(split, split)}
                yield row, raw
    return saved()


def checkpoint_inputs(config: dict) -> list[str]:
    """The record keys (canonical) a checkpoint can read: its modalities, and the prompt text of a generator."""
    mods = []
    for m in config.get("model", {}).get("modalities", []):
        if m in modalities.names() and modalities.get(m).carried_by:  # a video's soundtrack beside the record's
            mods += [modalities.carrier(m), modalities.get(m).encoder_of]  # own audio: both are read
        else:
            mods.append(m)
    mods = list(dict.fromkeys(mods))
    if tasks.of(config).reads_prompt and modalities.TEXT not in mods:
        mods.insert(0, "text")
    spoken = modalities.transcribed()
    if (config.get("preprocessing") or {}).get("transcribe") and "text" in mods and spoken not in mods:
        mods.append(spoken)  # transcribed into the text model's input (prepare --transcribe)
    return mods


def record_columns(raw: dict, trained: dict) -> dict[str, str | None]:
    """Per canonical key, the record's key: the training manifest's column name, else the usual names."""
    lower = {str(c).lower(): c for c in raw}
    cols: dict[str, str | None] = {}
    for k, names in candidates().items():
        own = trained.get(k)
        cols[k] = own if own in raw else next((lower[c] for c in [str(own or "").lower(), *names] if c in lower), None)
    return cols


class InputCheck:
    """Refuses records with none of a checkpoint's inputs (naming the keys expected) and warns once about each
    key it does not know."""

    def __init__(self, config: dict):
        self.trained = config.get("columns") or {}
        self.inputs = checkpoint_inputs(config)
        used = config.get("model", {}).get("modalities", [])
        # read only to route a carried part (a soundtrack is video_audio when the record has its own audio): a
        # record with nothing else has no input of this checkpoint
        self.auxiliary = {modalities.get(m).encoder_of for m in used if m in modalities.names()
                          and modalities.get(m).carried_by} - set(used)
        self.known = {c.lower() for names in candidates().values() for c in names}
        self.known |= {str(c).lower() for c in self.trained.values() if c}
        self.known |= {"conversation", FLAT}  # what flat_record adds to a conversation record
        self.warned: set[str] = set()
        names = [n for m in self.inputs if m not in self.auxiliary
                 for n in dict.fromkeys([self.trained.get(m) or m, m])]
        self.expected = " or ".join(f'"{n}"' for n in names) or "none (the checkpoint has no inputs)"

    def warn_unknown(self, raw: dict, cols: dict[str, str | None]) -> None:
        """Warn (once per key) about keys mmllm does not know, and about media this checkpoint does not use."""
        if len(self.warned) >= 100:  # enough said; and memory stays bounded on adversarial input
            return
        unknown = [k for k in raw if str(k).lower() not in self.known and k not in self.warned]
        unused = [cols[m] for m in modalities.input_roles()
                  if cols[m] and m not in self.inputs and cols[m] not in self.warned]
        for keys, what in ((unknown, "unknown key(s)"), (unused, "key(s) of inputs this checkpoint does not use")):
            if keys:
                from mmllm.console import warn

                self.warned.update(keys)
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                shown = ", ".join(repr(str(k)[:40]) for k in keys[:5]) + more
                warn(f"ignoring {what} {shown}: this checkpoint reads {self.expected} (and id, label, target)")

    def missing(self, rec: dict, raw: dict) -> RecordError | None:
        from mmllm.media import normalize_text

        if any(normalize_text(rec[m]) if m == "text" else rec[m] is not None for m in self.inputs
               if m not in self.auxiliary):
            return None
        got = ", ".join(str(k)[:40] for k in list(raw)[:8]) or "none"
        return RecordError(None, f"no input: expected {self.expected} (got keys: {got})")


def raw_records(source: str, config: dict, max_line_mb: float = MAX_LINE_MB
                ) -> Iterator[dict | tuple[dict, RecordError]]:
    """Records (or (stub, error)) of `-` (JSONL on stdin) or a manifest, in input order: see convert_rows."""
    rows, base = input_rows(source, max_line_mb)
    return convert_rows(rows, config, base)


def convert_rows(rows: Iterable[tuple[int, Any]], config: dict, base: Path, media_path: MediaPath = local_path
                 ) -> Iterator[dict | tuple[dict, RecordError]]:
    """(row number, raw dict or RecordError) -> records for a checkpoint, or (stub, error), in order. Each record
    has `given_id`: its id exactly as given. Columns: the training manifest's names, else the usual ones. A record
    with none of the checkpoint's inputs is an error naming the keys expected. `media_path` turns a media cell's
    text into the path read (serve: only under --media-root)."""
    check = InputCheck(config)
    for row, raw in rows:
        if isinstance(raw, RecordError):
            yield {"id": f"row{row}", "row": row}, raw
            continue
        raw = flat_record(raw)
        if isinstance(raw, RecordError):
            yield {"id": bad_id(raw, row), "row": row}, raw
            continue
        cols = record_columns(raw, check.trained)
        check.warn_unknown(raw, cols)
        stub = {"id": given_id(raw, cols["id"], row), "row": row}
        try:
            rec = checked_record(raw, row, cols, base, media_path)
        except RecordError as e:
            yield stub, e
            continue
        rec["given_id"] = stub["id"]
        problem = check.missing(rec, raw)
        yield (stub, problem) if problem else rec


FLAT = "_conversation_format"  # set on records that mmllm.conversations flattened


def json_array_rows(path: Path) -> list[tuple[int, Any]] | None:
    """(item number, object or RecordError) of a .json file holding one JSON array (LLaVA's and LLaMA-Factory's
    files), or None when the file is not one (JSON lines)."""
    if path.suffix.lower() != ".json":
        return None
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(JSON_SPACE + b"\xef\xbb\xbf")
    if not head.startswith(b"["):
        return None
    try:
        items = json.loads(utf8_text(path.read_bytes(), str(path)).removeprefix("\ufeff"))
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: expected a JSON array of records")
    return [(i, x if isinstance(x, dict) else RecordError(None, f"expected a JSON object, got {type(x).__name__}"))
            for i, x in enumerate(items, start=1)]


def flat_record(raw: dict) -> dict | RecordError:
    """A conversation record (LLaVA, ShareGPT, alpaca, OpenAI messages: mmllm.conversations) as a flat record, its
    problem as a RecordError; any other record as it is."""
    from mmllm import conversations

    fmt = conversations.detect(raw)
    if fmt is None:
        return raw
    try:
        return {**conversations.flatten(raw, fmt), FLAT: fmt}
    except conversations.FormatError as e:
        return RecordError(e.column, e.reason, record_id=given_id(raw, "id", 0) if "id" in raw else None)


def conversation_rows(columns: list[str], rows: Iterable[tuple[int, Any]]) -> tuple[list[str], Iterator]:
    """A manifest's rows with its conversation records flattened (flat_record), and their columns; one line on
    stderr says what was read."""
    from mmllm import conversations
    from mmllm.console import log

    rows = list(rows)
    out, counts, turns = [], {}, 0
    for row, raw in rows:
        if isinstance(raw, dict) and (fmt := conversations.detect(raw)):
            raw = flat_record(raw)
            counts[fmt] = counts.get(fmt, 0) + 1
            if isinstance(raw, dict):
                turns += sum(t["role"] == "assistant" for t in json.loads(raw["conversation"])["messages"])
        out.append((row, raw))
    if not counts:
        return columns, iter(rows)
    log(conversations.summary(counts, turns, sum(counts.values())))
    flat = ["id", "text", *modalities.names(), "target", "split"]
    carried = dict.fromkeys(k for _, r in out if isinstance(r, dict) for k in r)  # labels, the user's own columns
    return flat + [k for k in carried if k not in flat and k not in (FLAT, "conversation")], iter(out)
