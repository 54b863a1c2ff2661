"""`mmllm prepare`: records -> canonical media -> frozen encoder features -> Arrow DatasetDict on disk.

Flow: read records (records.py) -> assign splits -> take this shard -> add augmented training variants ->
for each chunk: hash media, reuse cached features, decode the rest (threads, prefetched while the encoders
run), encode once per distinct file -> append rows to per-split Arrow files -> save_to_disk in a temporary
folder -> rename into place. Memory stays bounded by the chunk size, not the dataset size.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any

from mmllm import modalities, outputs
from mmllm.config import PrepareConfig, default, save_resolved
from mmllm.console import emit, log, progress, show, warn
from mmllm.errors import UserError
from mmllm.features import META, SCHEMA_VERSION, SPLITS, FeatureStore, Preprocessing, arrow_schema, encode_chunk, \
    label_column, load_chunk, load_encoders, load_prepared
from mmllm.records import CANDIDATES, ColumnMap, RecordError, assign_splits, error_entry, format_error, keys, \
    read_records

CHUNK = 256
PREPARED = outputs.marked_folder("a prepared dataset", META, writes=(META, "prepare_config.json", "dataset_dict.json",
                                                                     *SPLITS))


# ---------------------------------------------------------------- entry point

def run(cfg: PrepareConfig) -> int:
    outputs.check(cfg.output, PREPARED, cfg.input, cfg.overwrite)
    with outputs.lock(cfg.output):  # a second prepare on the same --output meanwhile is refused
        if cfg.merge:
            return merge(cfg)
        with engine(cfg) as precision:  # ray: an auto --precision as the workers resolve it
            return build(dataclasses.replace(cfg, precision=precision) if precision else cfg)


def engine(cfg: PrepareConfig) -> Any:
    """Where build's chunks are encoded: here, or (--engine ray) on a Ray cluster connected meanwhile."""
    if cfg.engine != "ray":
        return nullcontext()
    from mmllm import ray_engine

    return ray_engine.cluster(cfg)


def counted() -> str:
    """What prepare's feature counts count: "image, audio, video and transcript"."""
    return modalities.spelled((*modalities.names(), "transcript"), "and")


def build(cfg: PrepareConfig) -> int:
    """Records -> features -> the prepared dataset at --output."""
    start = time.perf_counter()
    out = Path(cfg.output)
    records, errors, cols = read_records(cfg.input[0], {k: getattr(cfg, f"{k}_column", None) for k in keys()})
    records = check_records(records, errors, has_label=bool(cols["label"]))
    if cfg.transcribe is None:  # auto: the embedded Whisper that encodes the audio also says what it hears
        spoken = modalities.transcribed()
        cfg = dataclasses.replace(cfg, transcribe=bool(spoken and cols[spoken]) and any(r[spoken] for r in records)
                                  and getattr(cfg, f"{spoken}_model") == default(PrepareConfig, f"{spoken}_model"))
        if cfg.transcribe:
            log(f"transcribing the audio with {cfg.transcribe_model} for the text model (--no-transcribe: off)")
    reference = reference_column(cfg, cols)
    report_columns(cols, records, reference if cfg.transcribe else None)
    if reference and not cfg.transcribe and cfg.transcript_reference_column:
        warn(f"--transcript-reference-column {reference}: not used, prepare transcribes nothing (--transcribe is "
             "off or there is no audio)")
    assign_splits(records, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    bad_split = [r for r in records if r["split"] not in SPLITS]
    for r in bad_split:
        errors.append(error_entry(r, RecordError(cols["split"], f"unknown split '{r['split']}' "
                                                                f"(use train, validation or test)")))
    records = [r for r in records if r["split"] in SPLITS]
    warn_splits(records, has_label=bool(cols["label"]))
    records = [r for i, r in enumerate(records) if i % cfg.num_shards == cfg.shard_index]
    if cfg.shard_index > 0:
        errors = []  # errors found while reading the manifest are reported once, by shard 0
    roles = [role for role in modalities.input_roles() if cols[role] and any(r[role] for r in records)]
    carried = {p for m in roles if m != modalities.TEXT for p in modalities.get(m).parts}  # e.g. soundtracks
    carried |= {s for m in roles if m != modalities.TEXT for p in modalities.get(m).parts  # next to the record's own
                if (s := modalities.spare(m, p)) and any(r[m] and r[p] for r in records)}
    roles = [role for role in modalities.roles() if role in roles or role in carried]
    spoken = modalities.transcribed()
    if cfg.transcribe and spoken in roles and modalities.TEXT not in roles:
        roles.insert(0, modalities.TEXT)  # the transcripts become the text model's input
    elif cfg.transcribe and spoken not in roles:
        warn(f"--transcribe: no record has {spoken}, nothing to transcribe")
    references = read_references(cfg, reference) if cfg.transcribe and reference else None
    if not records:
        _report(errors, cfg)
        raise UserError(f"no usable records in {cfg.input[0]}")
    encoders = load_encoders(cfg, roles)
    # the resolved options (what prepare_config.json records): a new config, the caller's is left as it was given
    cfg = dataclasses.replace(cfg, max_text_tokens=check_text_limit(encoders.get("text"), cfg.max_text_tokens))
    check_trunk_layers(encoders.get("text"), cfg.text_trunk_layers)
    records = augment_records(records, cfg.augment)
    tmp = outputs.beside(out, folder=True)
    try:
        where = {"name": cfg.engine}  # the engine, as build_meta records it
        rows_per_split, errors = encode_and_write(records, errors, encoders, cfg, tmp, where)
        _report(errors, cfg)
        if not sum(rows_per_split.values()):
            raise UserError(f"every record of {cfg.input[0]} was skipped ({len(errors)} errors, see above)")
        labels = sorted({lab for lab in _labels(tmp) if lab is not None})
        meta = build_meta(cfg, cols, encoders, rows_per_split, labels, errors, where)
        if cfg.text_trunk_layers:
            meta["text_trunk"]["bytes_per_record"] = trunk_bytes(tmp, sum(rows_per_split.values()))
            log(f"text trunk states: {meta['text_trunk']['bytes_per_record']:,} bytes per record "
                f"({meta['text_trunk']['dtype']}, after layer {meta['text_trunk']['after_layer']} of "
                f"{meta['text_trunk']['layers']})")
        if cfg.keep_media:
            kept = [r for r in encoders if f"{r}_bytes" in meta["features"]]
            log(f"media kept: {', '.join(f'{r}_bytes' for r in kept)} hold each file as read: a vision-language "
                "--decoder encodes those media itself with its own processor (the frozen encoders' features are "
                "stored too, for the other models)")
        if "transcript" in encoders:
            meta["transcripts"] = transcript_report(encoders["transcript"], tmp, references)
        _finish(tmp, out, meta, cfg)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {"output": str(out), "counts": rows_per_split, "skipped": len(errors), "labels": len(labels),
               "seconds": round(time.perf_counter() - start, 2)}
    if cfg.text_trunk_layers:
        summary["text_trunk_bytes_per_record"] = meta["text_trunk"]["bytes_per_record"]
    if cfg.keep_media:
        summary["media_kept"] = [r for r in encoders if f"{r}_bytes" in meta["features"]]
    if meta.get("transcripts"):
        summary["transcripts"] = {k: v for k, v in meta["transcripts"].items() if not k.endswith("_definition")}
    emit(summary)
    return 0


def check_records(records: list[dict], errors: list[dict], has_label: bool) -> list[dict]:
    """Drop duplicate ids (the later ones) and records with an empty label, reporting each."""
    seen: dict[str, int] = {}
    kept = []
    for r in records:
        if r["id"] in seen:
            errors.append(error_entry(r, RecordError("id", f"duplicate id '{r['id']}' (first at row {seen[r['id']]})")))
            continue
        seen[r["id"]] = r["row"]
        if has_label and (r["label"] is None or r["label"] == "") and r.get("split") != "test":
            errors.append(error_entry(r, RecordError("label", "empty label")))
            continue
        if not any(r[m] for m in modalities.input_roles()):
            errors.append(error_entry(r, RecordError(None, f"no {modalities.spelled()}")))
            continue
        kept.append(r)
    return kept


def check_text_limit(text: Any, max_tokens: int) -> int:
    """--max-text-tokens must fit the text model's positions (longer inputs would fail finetune mid-epoch):
    a value given beyond them is refused; the default is lowered to them (and recorded)."""
    if text is None:
        return max_tokens
    config = getattr(text, "config", None)
    limits = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")]
    model_max = getattr(getattr(text, "tokenizer", None), "model_max_length", None)
    limits.append(model_max if isinstance(model_max, int) and model_max < 1_000_000 else None)  # else: unset
    limits = [n for n in limits if isinstance(n, int) and n > 0]
    if not limits or max_tokens <= min(limits):
        return max_tokens
    if max_tokens == default(PrepareConfig, "max_text_tokens"):
        log(f"max_text_tokens: {min(limits)}, the most the text model '{text.name}' takes")
        return min(limits)
    raise UserError(f"--max-text-tokens {max_tokens}: the text model '{text.name}' takes at most {min(limits)} "
                    f"tokens (its position limit); use --max-text-tokens {min(limits)} or less")


def check_trunk_layers(text: Any, k: int) -> None:
    """--text-trunk-layers K needs a text model of at least K layers that splits into trunk and top layers."""
    if not k:
        return
    if text is None:
        raise UserError(f"--text-trunk-layers {k}: the data has no text (no text column, or every text is empty)")
    from mmllm.text_layers import check_split

    check_split(text.config, k, "--text-trunk-layers", text.name)


def trunk_bytes(tmp: Path, records: int) -> int:
    """Mean bytes of the stored trunk states per record (the values alone, as the Arrow files hold them)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for f in (tmp / "_arrow").glob("*.arrow"):
        with pa.ipc.open_stream(str(f)) as reader:
            column = reader.read_all().column("text_trunk")
            values = pc.list_flatten(pc.list_flatten(column))
            total += len(values) * values.type.byte_width
    return round(total / max(1, records))


def report_columns(cols: dict, records: list[dict], reference: str | None = None) -> None:
    """Say which column became which role (and which one holds the reference transcripts); warn about columns
    left unused, media columns empty in every record, and a missing label/target column (naming the names
    looked for and the flags that set them). The reference column is no longer an unused one (nor in the
    prepared metadata's `ignored_columns`)."""
    if not isinstance(cols, ColumnMap):  # a class folder: labels are the folder names
        return
    if reference in cols.ignored:
        cols.ignored = [c for c in cols.ignored if c != reference]
    log("columns: " + ", ".join(f"{key} <- {col}" for key, col in cols.items() if col)
        + (f", transcript reference <- {reference}" if reference else ""))
    if cols.ignored:
        flags = ", ".join(f"--{k}-column" for k in (*modalities.input_roles(), "label"))
        warn(f"columns not used: {', '.join(cols.ignored)} (give one a role with {flags} or --target-column)")
    for role in modalities.roles():
        if cols[role] and records and not any(r[role] for r in records):
            warn(f"column {cols[role]} ({role}) is empty in every record: no {role} features")
    if not cols["label"] and not cols["target"]:
        warn(f"no label or target column found (looked for {', '.join(CANDIDATES['label'])}; "
             f"{', '.join(CANDIDATES['target'])}): name it with --label-column (to classify) or --target-column "
             "(to generate), or finetune has nothing to learn")


def warn_splits(records: list[dict], has_label: bool) -> None:
    """Warn when finetune could not use the splits: no training or validation records, or a single class."""
    counts = Counter(r["split"] for r in records)
    for split in ("train", "validation"):
        if records and not counts[split]:
            warn(f"no {split} records ({dict(counts)}): finetune needs train and validation records; "
                 "add records, or change --val-fraction / the split column")
    classes = {r["label"] for r in records if r["split"] == "train" and r["label"] not in (None, "")}
    if has_label and len(classes) == 1:
        warn(f"every training record has the label '{next(iter(classes))}': a classifier cannot learn from one "
             "class (is --label-column the right column?)")


def augment_records(records: list[dict], k: int) -> list[dict]:
    """K augmented copies of each training record (id `ID~augN`); validation/test untouched."""
    if k <= 0:
        return records
    out = []
    for r in records:
        out.append(r)
        if r["split"] == "train":
            out.extend({**r, "id": f"{r['id']}~aug{i}", "aug": i} for i in range(1, k + 1))
    return out


# ---------------------------------------------------------------- encode + write

def encode_and_write(records: list[dict], errors: list[dict], encoders: dict, cfg: PrepareConfig,
                     tmp: Path, where: dict) -> tuple[dict[str, int], list[dict]]:
    """Chunks of records -> Arrow rows (here, or on a Ray cluster with --engine ray) -> one file per split.
    `where`: the engine's description, completed by the Ray engine (actors, nodes)."""
    tally = {"hits": 0, "misses": 0, "engine": where}  # features reused (cache or identical files) / encoded now
    pre = Preprocessing.of(cfg, encoders.get("transcript"))
    schema = arrow_schema(encoders, pre)
    if cfg.engine == "ray":
        from mmllm import ray_engine

        chunks = ray_engine.encoded_chunks(records, encoders, cfg, schema, tally, CHUNK)
    else:
        chunks = local_chunks(records, encoders, pre, cfg.num_workers, schema, tally)
    files = SplitFiles(tmp / "_arrow", schema)
    try:
        log(f"features of each {counted()}: encoded now, or reused (from the feature cache or an identical file)")
        with progress("prepare", total=len(records)) as advance, closing(chunks):
            for batch, chunk_errors, n in chunks:
                errors.extend(chunk_errors)
                if cfg.on_error == "fail" and errors:
                    raise UserError(format_error(errors[0]))
                files.write(batch)
                advance(n, info=f"{tally['misses']} encoded, {tally['hits']} reused")  # short: 80 columns
    finally:
        files.close()
    log(f"features: {tally['misses']} encoded, {tally['hits']} reused (counted per {counted()}; reused: from the "
        "feature cache, or an identical file of this run)")
    return {s: n for s, n in files.counts.items() if n}, errors


def local_chunks(records: list[dict], encoders: dict, pre: Preprocessing, num_workers: int, schema: Any,
                 tally: dict) -> Iterator[tuple[Any, list[dict], int]]:
    """(Arrow rows, errors, records) per chunk of CHUNK records, in order, encoded in this process: the next chunk is
    decoded (threads) while this one is encoded."""
    import pyarrow as pa

    store = FeatureStore(pre.cache)
    chunks = [records[i:i + CHUNK] for i in range(0, len(records), CHUNK)]
    workers = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    prefetch = ThreadPoolExecutor(1)
    try:
        pending = prefetch.submit(load_chunk, chunks[0], encoders, store, pre, workers) if chunks else None
        for i in range(len(chunks)):
            loaded = pending.result()
            if i + 1 < len(chunks):  # decode the next chunk while this one is encoded
                pending = prefetch.submit(load_chunk, chunks[i + 1], encoders, store, pre, workers)
            rows, chunk_errors = encode_chunk(loaded, encoders, store, pre)
            tally.update(hits=store.reused, misses=store.misses)
            yield pa.RecordBatch.from_pylist(rows, schema=schema), chunk_errors, len(loaded)
    finally:
        prefetch.shutdown(cancel_futures=True)
        if workers:
            workers.shutdown(cancel_futures=True)


class SplitFiles:
    """Arrow rows appended to one stream file per split (FOLDER/train.arrow, ...), each created at its first row."""

    def __init__(self, folder: Path, schema: Any):
        folder.mkdir(parents=True)
        self.folder, self.schema = folder, schema
        self.writers: dict[str, Any] = {}
        self.counts = {s: 0 for s in SPLITS}

    def write(self, batch: Any) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        for split in SPLITS:
            part = batch.filter(pc.equal(batch.column("split"), split))
            if not part.num_rows:
                continue
            if split not in self.writers:
                self.writers[split] = pa.ipc.new_stream(str(self.folder / f"{split}.arrow"), self.schema)
            self.writers[split].write_batch(part)
            self.counts[split] += part.num_rows

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


# ---------------------------------------------------------------- augmentation (training records only)

# ---------------------------------------------------------------- output

def _labels(tmp: Path) -> list:
    import pyarrow as pa

    labels: list = []
    for f in (tmp / "_arrow").glob("*.arrow"):
        with pa.ipc.open_stream(str(f)) as reader:
            labels += reader.read_all().column("label").to_pylist()
    return labels


def _finish(tmp: Path, out: Path, meta: dict, cfg: Any) -> None:
    """Arrow stream files -> DatasetDict.save_to_disk + metadata, then rename into place."""
    import datasets

    datasets.disable_progress_bars()
    arrow_dir = tmp / "_arrow"
    parts = {f.stem: with_class_labels(datasets.Dataset.from_file(str(f)), meta["labels"])
             for f in sorted(arrow_dir.glob("*.arrow"))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp / "data"))
    del parts
    shutil.rmtree(arrow_dir)
    for f in (tmp / "data").iterdir():
        f.rename(tmp / f.name)
    (tmp / "data").rmdir()
    (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    save_resolved(cfg, tmp / "prepare_config.json")
    outputs.replace(tmp, out, PREPARED, cfg.overwrite)


def with_class_labels(ds: Any, names: list[str]) -> Any:
    """`ds` with its label column as a `datasets.ClassLabel` of `names` (ids in that order; unlabeled rows stay
    null). Only the label column is rebuilt: the other columns stay as they are (memory-mapped). Without any
    label names (no label column) the column stays text."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    if not names:
        return ds
    strings = label_column(ds)
    ids = pc.index_in(strings, value_set=pa.array(names, pa.string())).cast(pa.int64())
    unknown = pc.sum(pc.and_(pc.is_null(ids), pc.is_valid(strings))).as_py()
    if unknown:
        raise ValueError(f"{unknown} labels are not among the label names")  # a bug, never a user's input
    table = ds.with_format("arrow")[:]  # (the rows in order, whatever indices mapping ds has)
    table = table.set_column(table.schema.get_field_index("label"), pa.field("label", pa.int64()), ids)
    features = ds.features.copy()
    features["label"] = datasets.ClassLabel(names=names)
    return datasets.Dataset(datasets.table.InMemoryTable(table), info=datasets.DatasetInfo(features=features))


def build_meta(cfg: PrepareConfig, cols: dict, encoders: dict, counts: dict, labels: list, errors: list,
               where: dict) -> dict:
    transcriber = encoders.get("transcript")
    encoders = {role: enc for role, enc in encoders.items() if role != "transcript"}  # the modalities
    features = {"transcript": ["string"]} if transcriber else {}
    for role, enc in encoders.items():
        if role == "text":
            features["input_ids"] = ["T"]
            features["text_pooled"] = [enc.dim]  # the frozen text model's mean-pooled token states
            if cfg.sentence_embedding:
                features["text_emb"] = [enc.dim]
            if cfg.text_trunk_layers:
                features["text_trunk"] = ["T", enc.dim]  # token states after layer L-K, the real tokens only
        else:
            features[f"{role}_emb"] = [enc.dim]
            if cfg.sequence_features:
                features[f"{role}_seq"] = [modalities.get(role).sequence_length(Preprocessing.of(cfg)), enc.dim]
            if cfg.keep_media:
                features[f"{role}_bytes"] = ["bytes"]  # the file as read, for a vision-language decoder
    trunk = None
    if cfg.text_trunk_layers:
        from mmllm.features import trunk_dtype
        from mmllm.text_layers import num_layers

        text = encoders["text"]
        trunk = {"top_layers": cfg.text_trunk_layers, "layers": num_layers(text.config),
                 "after_layer": num_layers(text.config) - cfg.text_trunk_layers, "dtype": trunk_dtype(text),
                 "text_model": text.identity}
    return {
        "schema_version": SCHEMA_VERSION,
        "mmllm_version": __import__("mmllm").__version__,
        "input": [str(Path(p).resolve()) for p in cfg.input],
        "columns": cols,
        "ignored_columns": list(getattr(cols, "ignored", [])),
        "modalities": list(encoders),
        "encoders": {role: enc.describe() for role, enc in encoders.items()},
        "features": features,
        "preprocessing": Preprocessing.of(cfg, transcriber).recorded(),
        "text_trunk": trunk,  # --text-trunk-layers: K (top_layers) of L (layers), the storage dtype
        "labels": labels,
        "has_target": bool(cols.get("target")),
        "counts": counts,
        "shard": {"index": cfg.shard_index, "count": cfg.num_shards},
        "engine": where,  # local, or ray with its actors and nodes
        "skipped": errors,
    }


REFERENCE_COLUMNS = ("transcript_reference", "reference")


def reference_column(cfg: PrepareConfig, cols: dict) -> str | None:
    """--transcript-reference-column, or an unused column named transcript_reference / reference; None if none."""
    given = cfg.transcript_reference_column
    return given or next((c for c in getattr(cols, "ignored", []) if c.lower() in REFERENCE_COLUMNS), None)


def read_references(cfg: PrepareConfig, column: str) -> tuple[str, dict[int, str]]:
    """(column, reference transcript per manifest row) of the reference `column` (`reference_column`)."""
    from mmllm.media import normalize_text
    from mmllm.records import read_table

    path = Path(cfg.input[0])
    if not path.is_file():
        raise UserError(f"--transcript-reference-column: {path} is a folder; references are read from a manifest")
    columns, rows = read_table(path)
    if column not in columns:
        raise UserError(f"--transcript-reference-column: no column '{column}' (columns: {', '.join(columns)})")
    return column, {row: normalize_text(raw.get(column)) for row, raw in rows if isinstance(raw, dict)}


def transcript_report(transcriber: Any, tmp: Path, references: tuple[str, dict[int, str]] | None) -> dict:
    """What --transcribe wrote: the recognizer, counts per record, and the WER against a reference column
    (metrics.error_rates, as `mmllm eval wer`; also after lowercasing and removing punctuation)."""
    import re

    import pyarrow as pa

    from mmllm.metrics import error_rates

    written: dict[int, str] = {}  # manifest row -> transcript (augmented copies share their record's)
    for f in (tmp / "_arrow").glob("*.arrow"):
        with pa.ipc.open_stream(str(f)) as reader:
            for r in reader.read_all().select(["row", "transcript"]).to_pylist():
                if r["transcript"] is not None:
                    written[r["row"]] = r["transcript"]
    report: dict[str, Any] = {"model": transcriber.name, "identity": transcriber.identity, "records": len(written),
                              "empty": sum(not t for t in written.values()), "transcribed": transcriber.clips}
    log(f"transcripts: {len(written)} records ({report['empty']} empty); {transcriber.clips} clips transcribed, "
        "the others from the cache or identical files")
    report["rejected"] = dict(transcriber.rejected)  # why the clips transcribed now were left empty -> clips
    report["rejected_definition"] = ("clips transcribed in this run (not those read from the feature cache) whose "
                                     "transcript was left empty, by reason; 'empty' counts every empty transcript")
    if transcriber.report():
        warn(transcriber.report())
    if references:
        column, refs = references
        plain = lambda xs: [" ".join(re.sub(r"[^\w\s']", " ", x.lower()).split()) for x in xs]  # noqa: E731
        rows = [r for r in sorted(written) if plain([refs.get(r) or ""])[0]]  # jiwer refuses an empty reference
        hyps, gold = [written[r] for r in rows], [refs[r] for r in rows]
        report.update(reference_column=column, wer=None, cer=None, wer_normalized=None, n_reference=len(rows))
        if rows:
            rates, loose = error_rates(hyps, gold), error_rates(plain(hyps), plain(gold))
            report.update({k: v for k, v in rates.items() if k != "n"}, wer_normalized=loose["wer"],
                          wer_normalized_definition="the same WER after lowercasing and replacing punctuation "
                                                    "(all but letters, digits, _ and ') by spaces")
            log(f"transcripts: WER {rates['wer']:.4f} (normalized {loose['wer']:.4f}) against column {column} "
                f"({len(rows)} records)")
    return report


def reason_kind(reason: str) -> str:
    """The part of a skip reason that records share, for the summary table: before its first ':' (the file's own
    detail after it), a conversation's "turn N: " taken off first (the turn differs, the problem does not)."""
    return re.sub(r"^turn \d+: ", "", reason).split(":")[0]


def _report(errors: list[dict], cfg: PrepareConfig) -> None:
    if not errors:
        return
    for e in errors[:20]:
        warn("skipped " + format_error(e))
    if len(errors) > 20:
        warn(f"... and {len(errors) - 20} more skipped records (all listed in {META})")
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(errors)} skipped records")
    table.add_column("column")
    table.add_column("reason")
    table.add_column("records", justify="right")
    reasons = Counter((e["column"] or "-", reason_kind(e["reason"])) for e in errors)
    for (col, reason), n in reasons.most_common():
        table.add_row(escape(col), escape(reason), str(n))  # a manifest's column name is plain text
    show(table)


# ---------------------------------------------------------------- merge shards

def _shard_difference(meta: dict, first: dict, mine: dict, theirs: dict, trunk: list) -> str:
    """What a shard's metadata has otherwise than the first shard's ("" when they merge): encoders by role, the
    stored columns (e.g. image_bytes of --keep-media), their shapes, the text trunk."""
    said = [f"{r} encoder {mine.get(r) or 'none'} vs {theirs.get(r) or 'none'}"
            for r in sorted(set(mine) | set(theirs)) if mine.get(r) != theirs.get(r)]
    cols, first_cols = meta["features"], first["features"]
    if only := sorted(set(cols) - set(first_cols)):
        said.append(f"columns only here: {', '.join(only)}")
    if only := sorted(set(first_cols) - set(cols)):
        said.append(f"columns only in the first: {', '.join(only)}")
    said += [f"{c} shape {cols[c]} vs {first_cols[c]}" for c in sorted(set(cols) & set(first_cols))
             if cols[c] != first_cols[c]]
    if trunk[0] != trunk[1]:
        said.append(f"text trunk {trunk[0] or 'none'} vs {trunk[1] or 'none'}")
    if bool(meta.get("has_target")) != bool(first.get("has_target")):
        said.append(f"targets {'here' if meta.get('has_target') else 'only in the first'}")
    if bool(meta.get("labels")) != bool(first.get("labels")):  # other label names merge; labels and none do not
        said.append(f"labels {'here' if meta.get('labels') else 'only in the first'}")
    return "; ".join(said)


def merge(cfg: PrepareConfig) -> int:
    import datasets

    start = time.perf_counter()
    loaded = [load_prepared(p) for p in cfg.input]
    first = loaded[0][1]
    for (_, meta), path in zip(loaded[1:], cfg.input[1:]):
        mine = {r: e["identity"] for r, e in meta["encoders"].items()}
        theirs = {r: e["identity"] for r, e in first["encoders"].items()}
        trunk = [{k: v for k, v in (m.get("text_trunk") or {}).items() if k != "bytes_per_record"}
                 for m in (meta, first)]
        if differs := _shard_difference(meta, first, mine, theirs, trunk):
            raise UserError(f"--merge: {path} was prepared otherwise than {cfg.input[0]}: {differs}; prepare the "
                            "shards with the same options")
    out = Path(cfg.output)
    tmp = outputs.beside(out, folder=True)
    try:
        parts = {}
        names = sorted({lab for _, m in loaded for lab in m["labels"]})
        for split in SPLITS:  # each shard's label ids are renumbered into the union of the shards' labels
            pieces = [with_class_labels(ds[split], names) for ds, _ in loaded if split in ds]
            if pieces:
                parts[split] = datasets.concatenate_datasets(pieces)
        datasets.DatasetDict(parts).save_to_disk(str(tmp))
        meta = dict(first)
        meta["counts"] = {s: len(d) for s, d in parts.items()}
        meta["labels"] = names
        meta["skipped"] = [e for _, m in loaded for e in m["skipped"]]
        meta["input"] = [str(Path(p).resolve()) for p in cfg.input]
        meta["shard"] = {"merged": len(loaded)}
        (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        outputs.replace(tmp, out, PREPARED, cfg.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    emit({"output": str(out), "counts": meta["counts"], "merged": len(loaded),
          "seconds": round(time.perf_counter() - start, 2)})
    return 0


# ---------------------------------------------------------------- featurize raw records (eval / predict)

