"""prepare overhead: `mmllm prepare` (in-process, no cache) against the bare encoder forward on the same inputs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from common import ROOT, encoder, quiet_stdout, sample_records, write_manifest

TARGET = "prepare / encoder forward <= 1.3"


def load_encoders(precision: str) -> dict:
    enc = {role: encoder(role, precision) for role in ("text", "image", "audio")}
    enc["image"].model, enc["audio"].model  # load weights outside the timed region, as prepare does once
    return enc


def encoder_forward(enc: dict, records: list[dict]) -> dict:
    """Seconds of each encoder on the already decoded, distinct inputs, and how many inputs each saw (text: the
    tokenizer and the text model's pooled states, as prepare computes them)."""
    from mmllm.media import load_audio, load_image, normalize_text

    distinct_audio = sorted({ROOT / "sample_data" / r["audio"] for r in records})
    inputs = {"image": [load_image(ROOT / "sample_data" / r["image"]) for r in records],
              "audio": [load_audio(a, 16000) for a in distinct_audio]}
    out = {}
    for role, items in inputs.items():
        t = time.perf_counter()
        for i in range(0, len(items), 32):
            enc[role].encode(items[i:i + 32])
        out[role] = (time.perf_counter() - t, len(items))
    texts = [normalize_text(r["text"]) for r in records]
    t = time.perf_counter()
    enc["text"].pooled(enc["text"].tokenize(texts, 128)["input_ids"])  # prepare stores the frozen pooled states
    out["text"] = (time.perf_counter() - t, len(texts))
    return out


def run(n: int, tmp: Path) -> dict:
    """ratio = prepare_s / encoder_forward_s (the sum of the three encoders' times)."""
    from mmllm import console
    from mmllm.config import PrepareConfig
    from mmllm.encoders import resolve_precision
    from mmllm.preparation import run as prepare_run

    tmp.mkdir(parents=True, exist_ok=True)
    records = sample_records(n)  # n <= 480: every image is a distinct file; audio clips repeat (48 distinct)
    manifest = write_manifest(tmp / "m.csv", records)
    cfg = PrepareConfig(input=[str(manifest)], output=str(tmp / "out"), cache=False, batch_size=32,
                        transcribe=False)  # the three encoders on both sides; transcription is timed on its own
    console.set_quiet(True)
    precision = resolve_precision(cfg.precision)  # the baseline runs the encoders as prepare does
    enc = load_encoders(precision)
    t = time.perf_counter()
    import datasets  # noqa: F401 - the writer's library (and pandas), imported once per process like torch: not
    # in the timed region, so a run of this benchmark alone measures what it measures after the others
    import_s = time.perf_counter() - t
    load = os.getloadavg()[0]
    t = time.perf_counter()
    with quiet_stdout():
        prepare_run(cfg)
    prepare_s = time.perf_counter() - t
    forward = encoder_forward(enc, records)
    forward_s = sum(s for s, _ in forward.values())
    return {"records": n, "prepare_s": prepare_s, "encoder_forward_s": forward_s, "ratio": prepare_s / forward_s,
            "records_per_s": {role: k / s for role, (s, k) in forward.items()}, "precision": precision,
            "note": "audio files repeat in sample_data; both sides encode each distinct clip once",
            "target": TARGET, "met": prepare_s / forward_s <= 1.3,
            "load_before": load, "datasets_import_s": import_s}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    rps = r["records_per_s"]
    return ([f"| prepare overhead ({r['records']} records) | {r['prepare_s']:.2f} s | encoder forward "
             f"{r['encoder_forward_s']:.2f} s | {r['ratio']:.2f} | {r['target']} | {r['met']} |"],
            [f"- prepare records/s: image {rps['image']:.1f}, audio {rps['audio']:.1f}, text {rps['text']:.0f}"
             + (f" (overhead measured {r.get('date', 'in this run')}, load average {r['load_before']:.1f})"
                if "load_before" in r else "")
             + (f"; a new process also imports `datasets` once: {r['datasets_import_s']:.2f} s, not in the ratio"
                if r.get("datasets_import_s", 0) > 0.05 else "")])
