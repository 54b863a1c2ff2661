"""Video prepare speed: frames/s of `mmllm prepare` on sample_data/videos.csv, as a fraction of the bare image
encoder's frames/s on the same (already decoded) frames, in the same run.

- prepare: in-process, no feature cache, no transcription, the default 8 frames per clip; half of the clips carry
  a soundtrack, which prepare decodes and encodes as the record's audio (its time is inside prepare's).
- baseline: the same frames decoded once beforehand by the video plug-in (untimed), then only the image encoder
  (`encode`, batches of 32), as prepare runs it (same precision).
- decode: the plug-in's frame decoding alone (PyAV), timed on its own, so the profile says where the time goes.

Run alone: `python bench/video_speed.py [--quick]` prints the results JSON; `python bench/run.py --only video`
also records it in bench/results.json and BENCHMARKS.md.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, encoder, quiet_stdout

TARGET = "measured (video frames/s in prepare as a fraction of the bare image encoder's frames/s)"
VIDEOS = ROOT / "sample_data" / "videos.csv"


def run(tmp: Path | None, quick: bool) -> dict:
    from mmllm import console
    from mmllm.config import PrepareConfig
    from mmllm.encoders import resolve_precision
    from mmllm.modalities.video import read_frames
    from mmllm.preparation import run as prepare_run

    rows = list(csv.DictReader(open(VIDEOS, encoding="utf-8")))[: 16 if quick else None]
    with tempfile.TemporaryDirectory() as folder:
        base = Path(tmp or folder) / "video"
        base.mkdir(parents=True, exist_ok=True)
        manifest = base / "videos.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({**r, "video": str(ROOT / "sample_data" / r["video"])} for r in rows)
        cfg = PrepareConfig(input=[str(manifest)], output=str(base / "out"), cache=False, batch_size=32,
                            transcribe=False)
        frames_per_clip = int(cfg.video_frames)
        precision = resolve_precision(cfg.precision)
        image = encoder("image", precision)
        _ = image.model  # weights loaded outside the timed regions, as prepare loads them once
        console.set_quiet(True)
        load = os.getloadavg()[0]
        t = time.perf_counter()
        with quiet_stdout():
            prepare_run(cfg)
        prepare_s = time.perf_counter() - t
    paths = [str(ROOT / "sample_data" / r["video"]) for r in rows]
    t = time.perf_counter()
    frames = [f for p in paths for f in read_frames(p, frames_per_clip, float(cfg.max_video_seconds),
                                                       image.image_size)]
    decode_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(frames), 32):
        image.encode(frames[i:i + 32])
    encode_s = time.perf_counter() - t
    n = len(frames)
    prepare_fps, encoder_fps = n / prepare_s, n / encode_s
    return {"clips": len(rows), "frames_per_clip": frames_per_clip, "frames": n, "prepare_s": prepare_s,
            "decode_s": decode_s, "image_encoder_s": encode_s, "prepare_frames_per_s": prepare_fps,
            "image_encoder_frames_per_s": encoder_fps, "decode_frames_per_s": n / decode_s,
            "ratio": prepare_fps / encoder_fps, "precision": precision, "target": TARGET, "met": None,
            "load_before": load, "load_after": os.getloadavg()[0],
            "note": "prepare also decodes and encodes the soundtracks of half of the clips (whisper-tiny.en)"}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    rows = [f"| video prepare ({r['clips']} clips x {r['frames_per_clip']} frames) | "
            f"{r['prepare_frames_per_s']:.1f} frames/s ({r['prepare_s']:.1f} s) | bare image encoder "
            f"{r['image_encoder_frames_per_s']:.1f} frames/s | {r['ratio']:.2f} | measured |  |"]
    lines = [f"- video prepare ({r.get('date', 'this run')}, {r['precision']}, load average {r['load_before']:.1f} "
             f"before, {r['load_after']:.1f} after): {r['frames']} frames; PyAV decoding alone "
             f"{r['decode_frames_per_s']:.0f} frames/s ({r['decode_s']:.1f} s), image encoder alone "
             f"{r['image_encoder_s']:.1f} s, prepare {r['prepare_s']:.1f} s ({r['note']})"]
    return rows, lines


if __name__ == "__main__":
    print(json.dumps(run(None, "--quick" in sys.argv), indent=2))
