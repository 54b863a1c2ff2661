"""Records and manifests: read CSV / JSONL / Parquet manifests, class folders and `save_to_disk` folders
into plain dicts, detect columns, and assign splits.

A record is a dict with the canonical keys `id, row, text, image, audio, label, target, split`; media
values are absolute paths, raw bytes, or None when the record lacks that modality.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from mmllm.errors import UserError

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3", ".oga", ".aiff", ".aif"}
CANDIDATES = {
    "id": ["id", "record_id", "uid", "key"],
    "text": ["text", "sentence", "caption", "prompt", "question", "context", "description", "utterance"],
    "image": ["image", "image_path", "img", "image_file", "picture", "photo", "filepath"],
    "audio": ["audio", "audio_path", "wav", "audio_file", "sound", "speech"],
    "label": ["label", "labels", "class", "category", "y"],
    "target": ["target", "answer", "response", "output", "summary", "target_text"],
    "split": ["split", "subset", "fold"],
}
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
               "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
KEYS = ("id", "text", "image", "audio", "label", "target", "split")


class RecordError(ValueError):
    """A record that cannot be used: which column, which file, why."""

    def __init__(self, column: str | None, reason: str, file: str | None = None):
        super().__init__(reason)
        self.column, self.reason, self.file = column, reason, file


def read_table(path: Path) -> tuple[list[str], Iterator[tuple[int, dict | RecordError]]]:
    """Column names and an iterator of (row number, row dict or RecordError) of a manifest file."""
    if not path.exists():
        raise UserError(f"input not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder; expected a manifest file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot read Parquet manifest {path}: {str(e).splitlines()[0]}") from None
        return table.column_names, ((i + 1, r) for i, r in enumerate(table.to_pylist()))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start}): "
                        "re-save it as UTF-8") from None
    if suffix in (".jsonl", ".ndjson", ".json"):
        return _jsonl_rows(text, path)
    if suffix in (".csv", ".tsv", ".txt"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if not columns:
            raise UserError(f"{path} is empty: expected a header row")

        def rows() -> Iterator[tuple[int, dict | RecordError]]:
            for i, r in enumerate(reader, start=2):  # row 1 is the header
                if None in r:
                    yield i, RecordError(None, f"{len(r[None]) + len(columns)} fields, header has {len(columns)}")
                    continue
                yield i, {k.strip(): v for k, v in r.items()}
        return columns, rows()
    raise UserError(f"{path}: unsupported manifest type '{suffix}' (use .csv, .tsv, .jsonl or .parquet)")


def _jsonl_rows(text: str, path: Path) -> tuple[list[str], Iterator]:
    lines = text.splitlines()
    parsed: list[tuple[int, Any]] = []
    columns: dict[str, None] = {}
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            parsed.append((i, RecordError(None, f"malformed JSON ({e.msg} at column {e.colno})")))
            continue
        if not isinstance(obj, dict):
            parsed.append((i, RecordError(None, f"expected a JSON object, got {type(obj).__name__}")))
            continue
        columns.update(dict.fromkeys(obj))
        parsed.append((i, obj))
    if not parsed:
        raise UserError(f"{path} is empty: no records")
    return list(columns), iter(parsed)


def detect_columns(columns: list[str], given: dict[str, str | None]) -> dict[str, str | None]:
    """Map canonical keys to column names: given flags win (and must exist), else the first candidate found."""
    lower = {c.lower(): c for c in columns}
    out: dict[str, str | None] = {}
    missing = []
    for key in KEYS:
        flag_value = given.get(key)
        if flag_value:
            if flag_value not in columns:
                missing.append(f"--{key}-column: no column '{flag_value}' (columns: {', '.join(columns)})")
            out[key] = flag_value
        else:
            out[key] = next((lower[c] for c in CANDIDATES[key] if c in lower), None)
    if missing:
        raise UserError("; ".join(missing))
    if not any(out[k] for k in ("text", "image", "audio")):
        raise UserError(f"no text, image or audio column found (columns: {', '.join(columns)}); "
                        "name them with --text-column / --image-column / --audio-column")
    return out


def _media(value: Any, base: Path) -> Any:
    """A media cell -> absolute path string, raw bytes, or None."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, dict):  # datasets Image/Audio-like {"bytes": ..., "path": ...}
        return value.get("bytes") or _media(value.get("path"), base)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if hasattr(value, "save"):  # a PIL image from a datasets folder
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    s = str(value).strip()
    if not s:
        return None
    p = Path(s).expanduser()
    return str(p if p.is_absolute() else (base / p))


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value


def to_record(raw: dict, row: int, cols: dict[str, str | None], base: Path) -> dict:
    rec: dict[str, Any] = {"row": row}
    for key in KEYS:
        col = cols.get(key)
        value = raw.get(col) if col else None
        if key in ("image", "audio"):
            rec[key] = _media(value, base)
        elif key == "split":
            s = _cell(value)
            rec[key] = SPLIT_NAMES.get(str(s).strip().lower(), str(s).strip().lower()) if s not in (None, "") else None
        else:
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
    return rec


def read_records(source: str, given_columns: dict[str, str | None]) -> tuple[list[dict], list[dict], dict]:
    """(records, errors, column map) of a manifest file, a class folder or a `save_to_disk` folder."""
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        return _read_saved_dataset(path, given_columns)
    if path.is_dir():
        return _read_class_folder(path)
    columns, rows = read_table(path)
    cols = detect_columns(columns, given_columns)
    records, errors = [], []
    for row, raw in rows:
        if isinstance(raw, RecordError):
            errors.append(error_entry({"id": f"row{row}", "row": row}, raw))
            continue
        try:
            records.append(to_record(raw, row, cols, path.parent))
        except RecordError as e:
            errors.append(error_entry({"id": raw.get(cols["id"]) if cols["id"] else f"row{row}", "row": row}, e))
    return records, errors, cols


def _read_class_folder(path: Path) -> tuple[list[dict], list[dict], dict]:
    records = []
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{path}: expected a manifest file or a folder of class subfolders")
    for cls in classes:
        for f in sorted(cls.rglob("*")):
            ext = f.suffix.lower()
            if not f.is_file() or (ext not in IMAGE_EXT and ext not in AUDIO_EXT):
                continue
            rec = {k: None for k in KEYS}
            rec.update(id=f.relative_to(path).as_posix(), row=len(records) + 1, label=cls.name)
            rec["image" if ext in IMAGE_EXT else "audio"] = str(f)
            records.append(rec)
    if not records:
        raise UserError(f"{path}: no image or audio files in its class subfolders")
    cols = {"id": None, "text": None, "image": "image" if any(r["image"] for r in records) else None,
            "audio": "audio" if any(r["audio"] for r in records) else None, "label": "label", "target": None,
            "split": None}
    return records, [], cols


def _read_saved_dataset(path: Path, given: dict) -> tuple[list[dict], list[dict], dict]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    parts = ds.items() if isinstance(ds, datasets.DatasetDict) else [(None, ds)]
    records, errors, cols = [], [], {}
    for split, part in parts:
        cols = detect_columns(part.column_names, given)
        for i, raw in enumerate(part, start=1):
            try:
                rec = to_record(raw, len(records) + 1, cols, path)
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
    """Seeded, stratified by label: records without a split get train / validation / test."""
    todo = [r for r in records if not r.get("split")]
    groups: dict[Any, list[dict]] = defaultdict(list)
    for r in todo:
        groups[r.get("label")].append(r)
    rng = random.Random(seed)
    for key in sorted(groups, key=lambda k: (k is None, str(k))):
        group = groups[key]
        rng.shuffle(group)
        n_test, n_val = round(len(group) * test_fraction), round(len(group) * val_fraction)
        for i, r in enumerate(group):
            r["split"] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"


# ---------------------------------------------------------------- raw records for eval / predict

def stdin_rows() -> Iterator[tuple[int, dict | RecordError]]:
    for i, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield i, RecordError(None, f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield i, RecordError(None, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield i, obj


def raw_records(source: str, config: dict) -> Iterator[dict | tuple[dict, RecordError]]:
    """Records (or (stub, error)) in input order. Columns: the training manifest's names, else the usual ones."""
    trained = config.get("columns") or {}
    if source == "-":
        rows, base = stdin_rows(), Path.cwd()
    else:
        _, rows = read_table(Path(source))
        base = Path(source).parent
    for row, raw in rows:
        if isinstance(raw, RecordError):
            yield {"id": f"row{row}", "row": row}, raw
            continue
        lower = {c.lower(): c for c in raw}
        cols = {k: trained.get(k) or next((lower[c] for c in CANDIDATES[k] if c in lower), None) for k in CANDIDATES}
        try:
            yield to_record(raw, row, cols, base)
        except RecordError as e:
            yield {"id": raw.get(cols.get("id") or "id", f"row{row}"), "row": row}, e
