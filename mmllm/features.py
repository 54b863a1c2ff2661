"""Features: the prepared-data format, the feature cache, and raw records -> model-ready rows.

One code path turns records into features for `prepare`, `eval` on a raw manifest and `predict`:
load_record (cache lookup or decode) -> encode_chunk (batched frozen encoders) -> rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from mmllm import hub, modalities
from mmllm.config import PrepareConfig, default
from mmllm.console import log, warn
from mmllm.errors import UserError, read_json
from mmllm.media import MediaError, check_bytes, check_file, normalize_text, shown
from mmllm.records import RecordError, error_entry

SCHEMA_VERSION = 1
META = "mmllm-prepared.json"
META_KEYS = ("encoders", "features", "columns", "preprocessing")  # what finetune / eval / merge read from META
SPLITS = ("train", "validation", "test")
ENCODER_CODE = 2  # bump when an encoder's computation changes, so cached features are not reused
CHARS_PER_TOKEN = 64  # text beyond max_text_tokens x this many characters is never tokenized


def load_prepared(path: str | Path) -> tuple[Any, dict]:
    """(DatasetDict, metadata) of a prepared folder, with a clear error when it is not one."""
    import datasets

    p = Path(path)
    meta_path = p / META
    if not meta_path.is_file():
        raise UserError(f"{p} is not a prepared dataset (no {META}); run `mmllm prepare` first")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("schema_version") != SCHEMA_VERSION:
        version = meta.get("schema_version") if isinstance(meta, dict) else None
        raise UserError(f"{p}: prepared with schema version {version}, this mmllm reads {SCHEMA_VERSION}: prepare it "
                        "again")
    missing = [k for k in META_KEYS if not isinstance(meta.get(k), dict)]
    if missing:
        raise UserError(f"{meta_path} has no {', '.join(repr(k) for k in missing)} (edited or damaged): prepare it "
                        "again")
    datasets.disable_progress_bars()
    try:
        data = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - e.g. ArrowInvalid of a damaged .arrow file, a missing dataset_info.json
        raise UserError(f"{p}: the prepared data cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160]}):"
                        " prepare it again") from None
    check_labels(p, data, meta)
    return data, meta


def check_labels(p: Path, data: Any, meta: dict) -> None:
    """Each split's label ids are named by its dataset_info.json (a `ClassLabel`); META's `labels` is the copy that
    finetune and merge read. A hand edit of one alone would silently unlabel records: refused, naming both."""
    labels = list(meta.get("labels") or [])
    for split, ds in data.items():
        names = getattr(ds.features.get("label"), "names", None)
        if names is None or names == labels:
            continue
        i = next((i for i, (a, b) in enumerate(zip(labels, names)) if a != b), min(len(labels), len(names)))
        ours, theirs = (repr(x[i]) if i < len(x) else "none" for x in (labels, names))
        raise UserError(f"{p / META} and {p / split / 'dataset_info.json'} disagree on the labels (id {i}: {ours} "
                        f"vs {theirs}), as after a hand edit: undo it, or prepare again (label names cannot be "
                        "edited in prepared data)")


def label_column(ds: Any) -> Any:
    """A prepared split's labels as an Arrow string array (null where unlabeled): a `ClassLabel` column's ids are
    decoded to their names; the string column of data prepared before labels were ClassLabel is read as is."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = ds.select_columns(["label"]).with_format("arrow")[:]["label"]
    names = getattr(ds.features["label"], "names", None)
    if names is None:
        return column.cast(pa.string())
    ids = pc.if_else(pc.less(column, 0), pa.scalar(None, column.type), column)  # -1: no label (datasets' custom)
    return pc.take(pa.array(names, pa.string()), ids)


def label_strings(ds: Any) -> list[str | None]:
    """The label names of a prepared split, one per row (None where unlabeled)."""
    return label_column(ds).to_pylist()


def load_encoders(cfg: PrepareConfig, roles: list[str]) -> dict[str, Any]:
    from mmllm.encoders import precision_note, resolve_precision

    precision = resolve_precision(cfg.precision)
    log(precision_note(cfg.precision, precision))
    out = shared_encoders({role: getattr(cfg, f"{modalities.encoder_role(role)}_model") for role in roles},
                          cfg.trust_remote_code, precision)
    if cfg.transcribe and modalities.transcribed() in roles:
        out["transcript"] = load_transcriber(cfg.transcribe_model, cfg.trust_remote_code, precision)
    return out


def shared_encoders(models: dict[str, str], trust_remote_code: bool, precision: str) -> dict[str, Any]:
    """Each role's encoder, by its model name; roles that share an encoder (a part-only modality and its
    encoder_of) get the same instance, loaded once."""
    from mmllm.modalities import load_encoder

    loaded: dict[tuple[str, str], Any] = {}
    out = {}
    for role, name in models.items():
        key = (modalities.encoder_role(role), name)
        if key not in loaded:
            loaded[key] = load_encoder(role, name, trust_remote_code, precision)
        out[role] = loaded[key]
    return out


def load_transcriber(name: str, trust_remote_code: bool = False, precision: str = "fp32") -> Any:
    """The speech recognizer of --transcribe, under the key "transcript" of an encoders dict (not a modality)."""
    from mmllm.encoders import Transcriber

    try:
        return Transcriber(name, trust_remote_code, precision)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the --transcribe-model '{name}': {str(e).splitlines()[0]}") from None


class FeatureStore:
    """Features by key: an in-run memo (dedup of identical files) over an on-disk safetensors cache.

    Each cache entry carries the sha256 of its tensors (names, dtypes, shapes, bytes) in its metadata; an entry
    that cannot be read, fails its checksum or has the wrong shape is recomputed (one warning per run), never
    reused. A cache folder that cannot be written (read-only, disk full) is a warning: the run goes on uncached."""

    def __init__(self, enabled: bool, memo_bytes: int = 256 << 20):
        self.root = hub.home() / "features"
        self.enabled = enabled
        self.memo: OrderedDict[str, dict] = OrderedDict()
        self.memo_bytes = memo_bytes  # bounded: memory must not grow with the number of records
        self.size = 0
        self.hits = self.misses = 0  # features found (cache or this run's memo) / encoded now
        self.shared = 0  # media identical to one encoded moments before in the same chunk (encoded once)
        self.bad = 0  # entries found unreadable, garbled or of the wrong shape (recomputed)
        self.writable = True
        self._lock = threading.Lock()  # get() runs in the decode threads

    def get(self, key: str, shapes: dict[str, tuple[int, ...]] | None = None) -> dict | None:
        """The features of `key`, or None to compute them. `shapes`: what a valid entry holds (tensors of these
        names and shapes); a cache entry that differs is recomputed."""
        if key in self.memo:
            self.memo.move_to_end(key)
            self.hits += 1
            return self.memo[key]
        if self.enabled:
            path = self._path(key)
            if path.is_file():
                value, problem = read_entry(path, shapes)
                if problem is not None:
                    self._discard(path, problem)
                    return None
                self._remember(key, value)
                self.hits += 1
                return value
        return None

    @property
    def reused(self) -> int:
        """Features not encoded again: from the cache, or shared with an identical file of this run."""
        return self.hits + self.shared

    def peek(self, key: str) -> dict | None:
        """Features encoded earlier in this run (no hit counted)."""
        return self.memo.get(key)

    def put(self, key: str, value: dict) -> None:
        self.misses += 1
        self._remember(key, value)
        if self.enabled and self.writable:
            path = self._path(key)
            tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_entry(tmp, value)
                tmp.replace(path)
            except Exception as e:  # noqa: BLE001 - the cache is an optimization: a failed write never fails the run
                tmp.unlink(missing_ok=True) if tmp.parent.is_dir() else None
                self.writable = False
                warn(f"cannot write the feature cache {self.root} ({_reason(e)}): features of this run are not "
                     "cached (free space or fix its permissions, or pass --no-cache)")

    def _discard(self, path: Path, problem: str) -> None:
        with self._lock:
            self.bad += 1
            first = self.bad == 1
        if first:
            warn(f"feature cache entry {path} {problem}: recomputed (so is any other bad entry this run)")
        try:
            path.unlink()
        except OSError:
            pass  # a read-only cache: the entry is recomputed each time, never reused

    def _remember(self, key: str, value: dict) -> None:
        if key in self.memo:
            return
        self.memo[key] = value
        self.size += sum(v.nbytes for v in value.values())
        while self.size > self.memo_bytes and len(self.memo) > 1:
            _, old = self.memo.popitem(last=False)
            self.size -= sum(v.nbytes for v in old.values())

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"


def tensors_checksum(value: dict) -> str:
    """sha256 over a cache entry's tensors: each name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(value):
        v = np.ascontiguousarray(value[name])
        h.update(json.dumps([name, v.dtype.str, list(v.shape)]).encode())
        h.update(v.tobytes())
    return h.hexdigest()


def write_entry(path: Path, value: dict) -> None:
    """A feature-cache entry: the tensors as safetensors, their checksum in the metadata."""
    from safetensors.numpy import save_file

    value = {k: np.ascontiguousarray(v) for k, v in value.items()}
    save_file(value, str(path), metadata={"sha256": tensors_checksum(value)})


def read_entry(path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[dict | None, str | None]:
    """(tensors, None) of a valid cache entry, or (None, what is wrong with it); `shapes`: of every tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            recorded = (f.metadata() or {}).get("sha256")
            value = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - truncated, garbled header, unreadable: recomputed
        return None, f"is unreadable ({_reason(e)})"
    if recorded is None:
        return None, "has no checksum (written by an older mmllm)"
    if tensors_checksum(value) != recorded:
        return None, "does not match its checksum (garbled)"
    if shapes is not None:
        got = {k: tuple(v.shape) for k, v in value.items()}
        if got != {k: tuple(s) for k, s in shapes.items()}:
            return None, f"holds shapes {got}, not the {shapes} the encoder gives"
    return value, None


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return text[:160]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw records become features, as one typed record: prepare builds it from its options (`of`) and writes
    it into the prepared metadata (`recorded`), finetune copies that into every checkpoint, and eval, predict and
    serve read it back (`read`) to featurize new records exactly as the training data was. The last three fields
    are limits of the run that reads records (not recorded): its file size limit, encoder batch and cache use."""

    max_text_tokens: int
    options: dict  # each modality's prepare options (e.g. max_audio_seconds): recorded at the top level
    precision: str  # what the frozen encoders ran in (resolved: fp32 or bf16)
    sequence_features: bool
    sentence_embedding: bool
    keep_media: bool  # each medium's file bytes are stored too ({role}_bytes), for a vision-language decoder
    augment: int
    seed: int
    transcribe: dict | None  # the transcriber's describe(); None: prepare did not transcribe
    text_trunk_layers: int
    max_file_mb: int
    batch_size: int
    cache: bool
    media_features: bool = True  # False: the media are decoded (checked) and kept, not encoded (a model that reads
    # their bytes itself: a vision-language decoder)

    RUN_ONLY = ("max_file_mb", "batch_size", "cache", "media_features")
    FIXED = {"text_normalization": "NFC, whitespace collapsed"}  # and each modality's `fixed`
    # what data prepared before these were recorded used (media_features: every prepare encodes them)
    UNRECORDED = {"precision": "fp32", "transcribe": None, "media_features": True}

    @classmethod
    def of(cls, cfg: PrepareConfig, transcriber: Any = None) -> Preprocessing:
        """The record of a prepare run (precision resolved as the encoders load it)."""
        from mmllm.encoders import resolve_precision

        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)
                  if f.name not in cls.UNRECORDED and f.name != "options"}
        options = {o.name: getattr(cfg, o.name) for _, o in modalities.options()}
        return cls(**values, options=options, precision=resolve_precision(cfg.precision),
                   transcribe=transcriber.describe() if transcriber is not None else None)

    @classmethod
    def read(cls, recorded: dict, **run: Any) -> Preprocessing:
        """The record as prepare wrote it; a field older data lacks takes what that data used: prepare's default
        (mmllm.config, the one statement of it) or UNRECORDED's value."""
        def value(name: str) -> Any:
            if name in run:
                return run[name]
            if name in recorded and name not in cls.RUN_ONLY:  # the run's limits are never taken from the data
                return recorded[name]
            return cls.UNRECORDED[name] if name in cls.UNRECORDED else default(PrepareConfig, name)

        options = {o.name: recorded.get(o.name, o.default) for _, o in modalities.options()}
        return cls(**{f.name: value(f.name) for f in dataclasses.fields(cls) if f.name != "options"}, options=options)

    def recorded(self) -> dict:
        """What the prepared metadata and checkpoints hold ("preprocessing"), the modalities' options flat."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in (*self.RUN_ONLY, "options")}
        fixed = {k: v for m in modalities.all() for k, v in m.fixed.items()}
        return {**out, **self.options, **self.FIXED, **fixed}

    def option(self, name: str) -> Any:
        """A modality's option (its default when the data was prepared before the modality had it)."""
        return self.options[name] if name in self.options else modalities.option_default(name)


def feature_shapes(role: str, encoder: Any, pre: Preprocessing) -> dict[str, tuple[int, ...]]:
    """The tensors `encode_media` stores for one medium: pooled (D,), and with --sequence-features seq (T, D), T
    its modality's seq_len."""
    shapes = {"pooled": (int(encoder.dim),)}
    if pre.sequence_features:
        shapes["seq"] = (modalities.get(role).sequence_length(pre), int(encoder.dim))
    return shapes


def content_hash(media: Any, max_mb: float | None = None) -> str:
    """sha256 of media bytes or of a file, which is first checked (stat only) to be a regular file of at
    most `max_mb` MB: a named pipe or a device is refused before anything opens it."""
    h = hashlib.sha256()
    if isinstance(media, bytes):
        check_bytes(media, max_mb)
        h.update(media)
        return h.hexdigest()
    p = Path(media)
    check_file(p, max_mb)
    try:
        return hub.sha256_file(p)
    except OSError as e:
        raise MediaError(f"cannot read ({e.strerror or e}): {p}") from None


def feature_key(role: str, digest: str, encoder: Any, pre: Preprocessing, aug: int, rec_id: str) -> str:
    parts = {"role": role, "content": digest, "encoder": encoder.identity, "pre": encoder.describe()["preprocessing"],
             "seq": pre.sequence_features, "aug": [aug, pre.seed, rec_id] if aug else 0}
    parts.update(modalities.get(role).key_parts(pre))
    if encoder.precision != "fp32":  # fp32 keys stay as before: features cached earlier were computed in fp32
        parts["precision"] = encoder.precision
        parts["code"] = ENCODER_CODE  # bf16 paths changed (e.g. folded BatchNorm): never reuse older bf16 features
    if getattr(encoder, "runtime", "torch") != "torch":
        parts["runtime"] = encoder.runtime  # OpenVINO's features are not PyTorch's to the last bit
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def transcript_key(digest: str, transcriber: Any, pre: Preprocessing) -> str:
    """Cache key of a clip's transcript: its content, the recognizer's identity, decoding and the limits of the
    spoken modality (its key_parts)."""
    parts = {"role": "transcript", "content": digest, "model": transcriber.identity,
             "pre": transcriber.describe()["preprocessing"], **modalities.get(modalities.transcribed()).key_parts(pre),
             "precision": transcriber.precision}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def text_value(text: str) -> dict:
    """A transcript as a feature-cache value (UTF-8 bytes), and back with `value_text`."""
    return {"utf8": np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()}


def value_text(value: dict) -> str:
    return bytes(np.asarray(value["utf8"], dtype=np.uint8)).decode("utf-8")


def load_chunk(chunk: list[dict], encoders: dict, store: FeatureStore, pre: Preprocessing, workers) -> list[dict]:
    """Per record: text, and for each medium either cached features or decoded media to encode."""
    mapper = workers.map if workers else map
    return list(mapper(lambda r: load_record(r, encoders, store, pre), chunk))


def load_record(rec: dict, encoders: dict, store: FeatureStore, pre: Preprocessing) -> dict:
    item = {"rec": rec, "error": None, "media": {}}
    try:
        for role in modalities.names():
            if role not in encoders or not rec.get(role):
                continue
            column = role
            digest = _digest(rec, role, pre)
            key = feature_key(role, digest, encoders[role], pre, rec.get("aug", 0), rec["id"])
            cached = store.get(key, feature_shapes(role, encoders[role], pre))
            if cached is not None:
                item["media"][role] = {"key": key, "digest": digest, "features": cached}
                continue
            try:
                decoded = modalities.get(role).decode(rec[role], encoders[role], pre)
                if rec.get("aug"):
                    decoded = modalities.get(role).augment(decoded, _rng(pre.seed, rec["id"], rec["aug"]),
                                                           encoders[role])
            except MediaError as e:
                raise RecordError(column, str(e), _file(rec[role])) from None
            except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
                raise RecordError(column, f"cannot decode ({decode_reason(e)})", _file(rec[role])) \
                    from None
            item["media"][role] = {"key": key, "digest": digest, "decoded": decoded}
        if pre.keep_media:  # checked above: a regular file (or bytes) within --max-file-mb that decodes
            item["bytes"] = {role: media_bytes(rec[role]) for role in item["media"] if role in modalities.names()
                             and rec.get(role) is not None}
        for source in [m for m in modalities.names() if modalities.get(m).parts and rec.get(m)]:
            for part in modalities.get(source).parts:  # the record's own part first, else the file's
                into = modalities.spare(source, part) if rec.get(part) else part
                if into and into in encoders and into not in item["media"]:
                    digest = item["media"][source]["digest"] if source in item["media"] else _digest(rec, source, pre)
                    entry = load_part(rec, source, part, encoders, store, pre, digest, into)
                    if entry is not None:
                        item["media"][into] = entry
        spoken = modalities.transcribed()
        if "transcript" in encoders and (rec.get(spoken) or spoken in item["media"]):
            item["transcript"] = load_transcript(rec, encoders, store, pre, item["media"].get(spoken))
    except RecordError as e:
        item["error"] = error_entry(rec, e)
    except Exception as e:  # noqa: BLE001 - one record's failure is that record's error, never the run's
        item["error"] = error_entry(rec, RecordError(None, decode_reason(e)))
    return item


def load_part(rec: dict, source: str, part: str, encoders: dict, store: FeatureStore, pre: Preprocessing,
              digest: str, into: str | None = None) -> dict | None:
    """The `part` medium a `source` file carries, as the input `into` (default `part`: a video's soundtrack is the
    record's audio when it has none, else its `video_audio`): cached features, or the part decoded by the source's
    plug-in for `into`'s encoder; None: the file has none."""
    into = into or part
    content = f"{digest}:{source}:{json.dumps(modalities.get(source).key_parts(pre), sort_keys=True)}"
    key = feature_key(into, content, encoders[into], pre, rec.get("aug", 0), rec["id"])
    entry = {"key": key, "digest": content, "source": source}
    cached = store.get(key, feature_shapes(into, encoders[into], pre))
    if cached is not None:
        return {**entry, "features": cached}
    decoded = _decode_part(rec, source, part, encoders[into], pre)
    if decoded is None:
        return None
    if rec.get("aug"):
        decoded = modalities.get(into).augment(decoded, _rng(pre.seed, rec["id"], rec["aug"]), encoders[into])
    return {**entry, "decoded": decoded}


def _decode_part(rec: dict, source: str, part: str, encoder: Any, pre: Preprocessing) -> Any:
    try:
        return modalities.get(source).decode_part(part, rec[source], encoder, pre)
    except MediaError as e:
        raise RecordError(source, f"{part}: {e}", _file(rec[source])) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
        raise RecordError(source, f"{part}: cannot decode ({decode_reason(e)})",
                          _file(rec[source])) from None


def _digest(rec: dict, role: str, pre: Preprocessing) -> str:
    try:
        return content_hash(rec[role], pre.max_file_mb)
    except MediaError as e:
        raise RecordError(role, str(e), _file(rec[role])) from None


def load_transcript(rec: dict, encoders: dict, store: FeatureStore, pre: Preprocessing, audio: dict | None) -> dict:
    """The record's cached transcript, or its audio to transcribe: the un-augmented clip (augmented copies share
    the transcript), decoded once when the audio encoder decoded it at the same rate."""
    transcriber, role = encoders["transcript"], modalities.transcribed()
    key = transcript_key(audio["digest"] if audio else _digest(rec, role, pre), transcriber, pre)
    cached = store.get(key)
    if cached is not None:
        return {"key": key, "text": value_text(cached)}
    if audio and "decoded" in audio and not rec.get("aug") and encoders[role].sample_rate == transcriber.sample_rate:
        return {"key": key, "decoded": audio["decoded"]}
    if audio and "source" in audio:  # the part of another file (a video's soundtrack)
        return {"key": key, "decoded": _decode_part(rec, audio["source"], role, transcriber, pre)}
    try:
        return {"key": key, "decoded": modalities.get(role).decode(rec[role], transcriber, pre)}
    except MediaError as e:
        raise RecordError(role, str(e), _file(rec[role])) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem
        raise RecordError(role, f"cannot decode ({decode_reason(e)})", _file(rec[role])) from None


def media_bytes(media: Any) -> bytes:
    """A medium's file content (a path is read; bytes are as given)."""
    return media if isinstance(media, bytes) else Path(media).read_bytes()


def _file(media: Any) -> str | None:
    return shown(media) if isinstance(media, str) else None


def decode_reason(e: Exception) -> str:
    """A decoder's exception as an error line quotes it: its type and message, no object addresses (an in-memory
    file is `<bytes>`), at most 120 characters."""
    text = re.sub(r"<[\w.]+ object at 0x[0-9a-f]+>", "<bytes>", str(e))
    return f"{type(e).__name__}: {text[:120]}"


def encode_media(good: list[dict], encoders: dict, store: FeatureStore, pre: Preprocessing) -> set[str]:
    """Encode each distinct medium still missing (batched) into the store; attach the features to the items
    (none with pre.media_features off: the encoders never run). Returns the keys whose features came out
    non-finite (NaN or inf): never stored, nor cached; encode_chunk makes them their records' errors."""
    bad: set[str] = set()
    if not pre.media_features:
        return bad
    for role in modalities.names():
        todo: dict[str, Any] = {}
        for it in good:
            m = it["media"].get(role)
            if m and "decoded" in m:
                if m["key"] in todo or store.peek(m["key"]) is not None:
                    store.shared += 1
                else:
                    todo[m["key"]] = m["decoded"]
        keys = list(todo)
        enc = encoders.get(role)
        for b in range(0, len(keys), pre.batch_size):
            batch = keys[b:b + pre.batch_size]
            pooled, seqs = enc.encode([todo[k] for k in batch])
            for j, k in enumerate(batch):
                value = {"pooled": pooled[j].astype(np.float32)}
                if pre.sequence_features:
                    value["seq"] = modalities.get(role).stored_sequence(np.asarray(seqs[j]), todo[k], enc, pre)
                if all(np.isfinite(v).all() for v in value.values()):
                    store.put(k, value)
                else:
                    bad.add(k)
        for it in good:
            m = it["media"].get(role)
            if m and "features" not in m and m["key"] not in bad:
                m["features"] = store.peek(m["key"])
    return bad


def non_finite(it: dict, bad: set[str], encoders: dict, text_ok: bool) -> dict | None:
    """The error entry of an item whose features came out NaN or inf (a damaged model or converted-model file, an
    input the model overflows on), else None: the record is skipped, never stored with features that would turn
    every training loss into NaN."""
    rec = it["rec"]
    for role, m in it["media"].items():
        if m["key"] in bad:
            column = m.get("source", role)
            name = getattr(encoders[role], "name", role)
            return error_entry(rec, RecordError(column, f"the {role} encoder ({name}) gave non-finite features "
                                                        "(NaN or inf) for it", _file(rec[column])))
    if not text_ok:
        name = getattr(encoders["text"], "name", "text")
        return error_entry(rec, RecordError("text", f"the text encoder ({name}) gave non-finite features (NaN or "
                                                    "inf) for it"))
    return None


def transcribe_chunk(good: list[dict], transcriber: Any, store: FeatureStore, pre: Preprocessing
                     ) -> list[str | None]:
    """Per item: its transcript (cached, or transcribed now once per distinct clip, batched), None without audio."""
    todo: dict[str, Any] = {}
    for it in good:
        t = it.get("transcript")
        if t and "decoded" in t:
            if t["key"] in todo or store.peek(t["key"]) is not None:
                store.shared += 1
            else:
                todo[t["key"]] = t["decoded"]
    keys = list(todo)
    for b in range(0, len(keys), pre.batch_size):
        batch = keys[b:b + pre.batch_size]
        for k, text in zip(batch, transcriber.transcribe([todo[k] for k in batch])):
            store.put(k, text_value(text))
    out: list[str | None] = []
    for it in good:
        t = it.get("transcript")
        out.append(None if t is None else t["text"] if "text" in t else value_text(store.peek(t["key"])))
    return out


def encode_chunk(loaded: list[dict], encoders: dict, store: FeatureStore, pre: Preprocessing
                 ) -> tuple[list[dict], list[dict]]:
    """Encode the distinct media still missing (batched), transcribe the audio (--transcribe), then assemble the
    Arrow rows."""
    errors = [it["error"] for it in loaded if it["error"]]
    good = [it for it in loaded if not it["error"]]
    bad = encode_media(good, encoders, store, pre)
    transcriber = encoders.get("transcript")
    transcripts = transcribe_chunk(good, transcriber, store, pre) if transcriber else [None] * len(good)
    text_enc = encoders.get("text")
    texts = [normalize_text(it["rec"]["text"]) for it in good]
    text_cols = text_columns(texts, transcripts if transcriber else None, text_enc, pre, store) \
        if text_enc and texts else {}
    states = text_cols.get("text_pooled")
    text_ok = np.isfinite(states).all(1) if states is not None else np.ones(len(good), bool)
    rows = []
    for i, it in enumerate(good):
        rec = it["rec"]
        if bad or not text_ok[i]:
            error = non_finite(it, bad, encoders, bool(text_ok[i]))
            if error:
                errors.append(error)
                continue
        row = {"id": rec["id"], "row": rec["row"], "split": rec["split"], "text": texts[i],
               "label": rec["label"], "target": normalize_text(rec["target"]) if rec["target"] is not None else None,
               "has_text": bool(texts[i] or transcripts[i]) and text_enc is not None,
               "conversation": rec.get("conversation")}  # turns of a conversation record (mmllm.conversations)
        if transcriber:
            row["transcript"] = transcripts[i]
        row.update({k: v[i] for k, v in text_cols.items()})
        for role in modalities.names():
            if role not in encoders:
                continue
            m = it["media"].get(role)
            row[f"has_{role}"] = m is not None
            if pre.media_features:
                row[f"{role}_emb"] = m["features"]["pooled"] if m else np.zeros(encoders[role].dim, np.float32)
            if pre.sequence_features and pre.media_features:
                n = modalities.get(role).sequence_length(pre)
                seq = m["features"]["seq"] if m else np.zeros((n, encoders[role].dim), np.float32)
                row[f"{role}_seq"] = list(seq)  # rows of a fixed-size list of fixed-size lists
            if pre.keep_media:
                row[f"{role}_bytes"] = it.get("bytes", {}).get(role)
        rows.append(row)
    return rows, errors


def text_columns(texts: list[str], transcripts: list[str | None] | None, text_enc: Any, pre: Preprocessing,
                 store: FeatureStore | None = None) -> dict[str, Any]:
    """Token ids and mask of each text (with its transcript as a second segment), the frozen text model's pooled
    states of exactly those tokens (`text_pooled`: a --freeze-text model reads them instead of running the text
    model in every step), with --text-trunk-layers K its token states after layer L-K (`text_trunk`, cached by
    `trunk_key`: finetune --train-text-layers K runs only the top K layers over them) and, with
    --sentence-embedding, the pooled states L2-normalized (`text_emb`)."""
    import torch

    from mmllm.encoders import l2_normalize

    # the tokenizer would read (and hold offsets for) a whole 15 MB text before truncating it to a few hundred
    # tokens: it only ever needs the head (no token of a real text is CHARS_PER_TOKEN characters long)
    heads = [t[:CHARS_PER_TOKEN * pre.max_text_tokens] for t in texts]
    pairs = [t and t[:CHARS_PER_TOKEN * pre.max_text_tokens] for t in transcripts] if transcripts else None
    tokens = text_enc.tokenize(heads, pre.max_text_tokens, pairs)
    cols = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    pooled = None
    if pre.text_trunk_layers:
        pooled, trunk = text_trunk(tokens["input_ids"], text_enc, pre.text_trunk_layers, store or FeatureStore(False))
        cols["text_trunk"] = [list(states) for states in trunk]  # rows of per-token fixed-size lists
    elif text_enc.states or pre.sentence_embedding:
        pooled = text_enc.pooled(tokens["input_ids"])
    if pooled is not None and text_enc.states:
        cols["text_pooled"] = pooled
    if pooled is not None and pre.sentence_embedding:
        cols["text_emb"] = l2_normalize(torch.from_numpy(pooled)).numpy()
    return cols


def trunk_dtype(text_enc: Any) -> str:
    """How trunk states are stored: bf16 when the encoders run bf16, else fp32."""
    return "bf16" if text_enc.precision == "bf16" else "fp32"


def trunk_key(ids: list[int], text_enc: Any, k: int) -> str:
    """Cache key of one text's trunk states: its token ids, the text model's identity, K and the precision."""
    parts = {"role": "text_trunk", "tokens": hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest(),
             "encoder": text_enc.identity, "layers": k, "precision": text_enc.precision, "code": ENCODER_CODE}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def text_trunk(input_ids: list[list[int]], text_enc: Any, k: int, store: FeatureStore
               ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(pooled states (N, D), per record its states after layer L-K as stored: (n_i, D) float32, or uint16 bf16 bit
    patterns), from the feature cache or one forward of the whole model per distinct token sequence missing."""
    from mmllm.text_layers import to_storage

    dtype = trunk_dtype(text_enc)
    keys = [trunk_key(ids, text_enc, k) for ids in input_ids]
    found: dict[str, dict] = {}
    missing: dict[str, list[int]] = {}
    for key, ids in zip(keys, input_ids):
        if key not in found and key not in missing:
            value = store.get(key, {"pooled": (text_enc.dim,), "states": (max(1, len(ids)), text_enc.dim)})
            if value is None:
                missing[key] = ids
            else:
                found[key] = value
    if missing:
        todo = list(missing)
        pooled, trunk = text_enc.pooled_and_trunk([missing[key] for key in todo], k)
        for key, p, t in zip(todo, pooled, trunk):
            found[key] = {"pooled": p, "states": to_storage(t, dtype)}
            store.put(key, found[key])
    return np.stack([found[key]["pooled"] for key in keys]), [found[key]["states"] for key in keys]


def arrow_schema(encoders: dict, pre: Preprocessing):
    import pyarrow as pa

    fields = [pa.field("id", pa.string()), pa.field("row", pa.int64()), pa.field("split", pa.string()),
              pa.field("text", pa.string()), pa.field("label", pa.string()), pa.field("target", pa.string()),
              pa.field("has_text", pa.bool_()), pa.field("conversation", pa.string())]
    if "transcript" in encoders:
        fields.append(pa.field("transcript", pa.string()))
    if "text" in encoders:
        fields += [pa.field("input_ids", pa.list_(pa.int32())), pa.field("attention_mask", pa.list_(pa.int8())),
                   pa.field("text_pooled", pa.list_(pa.float32(), encoders["text"].dim))]
        if pre.sentence_embedding:
            fields.append(pa.field("text_emb", pa.list_(pa.float32(), encoders["text"].dim)))
        if pre.text_trunk_layers:
            value = pa.uint16() if trunk_dtype(encoders["text"]) == "bf16" else pa.float32()
            fields.append(pa.field("text_trunk", pa.list_(pa.list_(value, encoders["text"].dim))))
    for role in modalities.names():
        if role in encoders:
            dim = encoders[role].dim
            fields += [pa.field(f"has_{role}", pa.bool_()), pa.field(f"{role}_emb", pa.list_(pa.float32(), dim))]
            if pre.sequence_features:
                n = modalities.get(role).sequence_length(pre)
                fields.append(pa.field(f"{role}_seq", pa.list_(pa.list_(pa.float32(), dim), n)))
            if pre.keep_media:
                fields.append(pa.field(f"{role}_bytes", pa.binary()))
    return pa.schema(fields)


def _rng(seed: int, rec_id: str, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, k, zlib.crc32(rec_id.encode())])


def featurize(records: list[dict], encoders: dict, pre: Preprocessing, store: FeatureStore | None = None
              ) -> tuple[list[dict], list[dict]]:
    """Raw records -> (model-ready rows, error entries), with the same code path as `prepare`."""
    store = store or FeatureStore(pre.cache)
    loaded = load_chunk(records, encoders, store, pre, None)
    return encode_chunk(loaded, encoders, store, pre)


def encoders_for_checkpoint(folder: Path, config: dict, trust_remote_code: bool = False,
                            precision: str = "checkpoint", text_states: bool = False,
                            transcripts: bool | None = None) -> dict:
    """The encoders a checkpoint was trained on, verified by identity; the text tokenizer comes from the folder.

    `precision` "checkpoint" runs them as the checkpoint's data was prepared (fp32 when it recorded none);
    `text_states`: featurize computes the frozen text model's pooled states (the model reads them, not tokens);
    `transcripts`: the model reads prepare's transcripts (a generator's prompt), so the audio is transcribed as
    prepare did; None: when it has a text model (which read text + transcript)."""
    from mmllm.encoders import TextEncoder, precision_note, resolve_precision

    requested = precision
    if precision == "checkpoint":
        precision = (config.get("preprocessing") or {}).get("precision", Preprocessing.UNRECORDED["precision"])
    precision = resolve_precision(precision)
    log(precision_note(requested, precision))
    out = {}
    roles = list(config["model"]["modalities"])
    if "text" in roles and (folder / "text_model").is_dir():  # classification: the tokenizer travels with it
        out["text"] = TextEncoder(str(folder / "text_model"), precision=precision)
    loaded = shared_encoders({r: config["encoders"][r]["name"] for r in roles if r not in out}, trust_remote_code,
                             precision)
    for role, enc in loaded.items():
        recorded = config["encoders"][role]
        if enc.identity != recorded["identity"]:
            raise UserError(f"{role} encoder '{recorded['name']}' is now {enc.identity}, but the checkpoint was "
                            f"trained on {recorded['identity']}")
    out.update(loaded)
    if "text" in out:
        out["text"].states = text_states
    recorded = config.get("preprocessing", {}).get("transcribe")
    if recorded and ("text" in out if transcripts is None else transcripts):  # trained on them: as prepare did
        out["transcript"] = load_transcriber(recorded["name"], trust_remote_code, precision)
        if out["transcript"].identity != recorded["identity"]:
            raise UserError(f"--transcribe-model '{recorded['name']}' is now {out['transcript'].identity}, but the "
                            f"checkpoint was trained on transcripts of {recorded['identity']}")
    return out


def checkpoint_preprocessing(config: dict, max_file_mb: int, media_features: bool = True) -> Preprocessing:
    """How a checkpoint's records are featurized: as its data was prepared (the Preprocessing it recorded), with
    this run's file limit and no feature cache; no text trunk states (the checkpoint holds its whole text model);
    `media_features` False for a model that reads the kept media's bytes, not their features."""
    return Preprocessing.read(config.get("preprocessing") or {}, max_file_mb=max_file_mb, cache=False,
                              text_trunk_layers=0, media_features=media_features)


# ---------------------------------------------------------------- a split to evaluate

def split_columns(cfg: Any, config: dict, mods: list[str], text_states: bool = False,
                 transcripts: bool | None = None, media_features: bool = True) -> tuple[dict, str, str]:
    """(columns, source, split name) of the split: a prepared folder (encoders checked) or a raw manifest
    featurized on the fly."""
    data = Path(cfg.data)
    if (data / META).is_file():
        ds, meta = load_prepared(data)
        for role in mods:
            mine, theirs = config["encoders"][role]["identity"], meta["encoders"].get(role, {}).get("identity")
            if mine != theirs:
                raise UserError(f"{data} was prepared with other encoders: {role} is {theirs}, the checkpoint "
                                f"was trained on {mine}; prepare it again with --{role}-model "
                                f"{config['encoders'][role]['name']}")
        if cfg.split not in ds:
            raise UserError(f"--split: {data} has no split '{cfg.split}' (has: {', '.join(ds)})")
        part = ds[cfg.split]
        if "text_trunk" in part.column_names:  # the checkpoint holds the whole text model: it runs on the token ids
            part = part.remove_columns("text_trunk")
        columns = part.with_format("numpy")[:]
        columns["label"] = label_strings(ds[cfg.split])  # names (the prepared column is a ClassLabel of ids)
        return columns, str(data), cfg.split
    from mmllm.records import raw_records

    encoders = encoders_for_checkpoint(Path(cfg.checkpoint), config, precision=cfg.precision, text_states=text_states,
                                       transcripts=transcripts)
    records = []
    for item in raw_records(str(data), config):
        if isinstance(item, tuple):
            warn(f"skipped record {item[0]['id']}: {item[1].reason}")
        else:
            records.append(item)
    records, split = raw_split(records, cfg.split, data)
    rows, bad = featurize(records, encoders, checkpoint_preprocessing(config, cfg.max_file_mb, media_features))
    for e in bad:
        warn(f"skipped record {e['id']}: {e['reason']}")
    if not rows:
        raise UserError(f"{data}: no usable records for split '{split}'")
    return {k: [r.get(k) for r in rows] for k in rows[0]}, str(data), split


def raw_split(records: list[dict], wanted: str, data: Path) -> tuple[list[dict], str]:
    """The records of split `wanted` of a raw manifest, and the split's name. Without split values every record
    is used, under the name "all"; a split the manifest does not have is an error."""
    from mmllm.records import SPLIT_NAMES

    present = sorted({r["split"] for r in records if r.get("split")})
    if not present:
        warn(f"{data} has no split column: evaluating all {len(records)} records (reported as split 'all')")
        return [dict(r, split="all") for r in records], "all"
    name = SPLIT_NAMES.get(wanted.strip().lower(), wanted.strip().lower())
    if name not in present:
        raise UserError(f"--split: {data} has no split '{wanted}' (has: {', '.join(present)})")
    unsplit = sum(not r.get("split") for r in records)
    if unsplit:
        warn(f"{unsplit} records of {data} have no split value: not evaluated")
    return [r for r in records if r.get("split") == name], name
