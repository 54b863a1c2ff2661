"""Frozen-encoder precision: `mmllm prepare` and the bare encoder forward, fp32 vs --precision auto, in one run.

For each modality alone (images, audio clips, texts with --sentence-embedding), on sample_data:
prepare items/s (in-process, no cache, weights loading included) and the bare encoder's items/s on the already
decoded inputs, for fp32 and for auto (bf16 autocast + channels_last where the CPU has native bf16). fp32 is
PyTorch's (MMLLM_IMAGE_RUNTIME=torch): the baseline before OpenVINO; auto is the default, which for the image
encoder is OpenVINO's fp32 when `openvino` is installed (its features equal PyTorch's fp32, tests/test_precision).
Every timing is the best of `repeat` runs, fp32 and auto alternating, so both see the same machine load
(the load average before and after is reported: other processes share these cores).

Run alone: `python bench/precision.py [--quick]` prints the results JSON; run.py may call `run(quick)`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from common import ROOT, quiet_stdout, sample_records

TARGET = "prepare images/s auto / fp32 >= 2.5"
PRECISIONS = ("fp32", "auto")
# role -> (manifest columns, prepare model option, alias, prepare options)
ROLES = {"image": (("id", "image", "label"), "image_model", "efficientnet-lite0", {}),
         "audio": (("id", "audio", "label"), "audio_model", "whisper-tiny.en", {}),
         "text": (("id", "text", "label"), "text_model", "minilm", {"sentence_embedding": True})}


def manifest(path: Path, records: list[dict], columns: tuple[str, ...]) -> Path:
    """A CSV with only these columns (so prepare runs one encoder), media paths made absolute."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        for r in records:
            w.writerow({c: str(ROOT / "sample_data" / r[c]) if c in ("image", "audio") else r[c] for c in columns})
    return path


def distinct_inputs(role: str, records: list[dict]) -> list:
    """The decoded inputs prepare encodes: each distinct file once (audio repeats in sample_data)."""
    from mmllm.media import load_audio, load_image, normalize_text

    if role == "text":
        return [normalize_text(r["text"]) for r in records]
    files = sorted({ROOT / "sample_data" / r[role] for r in records})
    return [load_image(p) if role == "image" else load_audio(p, 16000) for p in files]


@contextlib.contextmanager
def runtime_for(precision: str) -> Iterator[None]:
    """fp32: PyTorch's (the baseline); auto: the default runtime (OpenVINO for the image encoder when installed)."""
    before = os.environ.get("MMLLM_IMAGE_RUNTIME")
    if precision == "fp32":
        os.environ["MMLLM_IMAGE_RUNTIME"] = "torch"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MMLLM_IMAGE_RUNTIME", None)
        else:
            os.environ["MMLLM_IMAGE_RUNTIME"] = before


def prepare_seconds(role: str, path: Path, out: Path, precision: str) -> float:
    from mmllm.config import PrepareConfig
    from mmllm.preparation import run as prepare_run

    _, option, alias, extra = ROLES[role]
    cfg = PrepareConfig(input=[str(path)], output=str(out), cache=False, batch_size=32, precision=precision,
                        overwrite=True, **{option: alias}, **extra)
    t = time.perf_counter()
    with quiet_stdout(), runtime_for(precision):
        prepare_run(cfg)
    return time.perf_counter() - t


def encoder_seconds(role: str, inputs: list, precision: str) -> float:
    """The bare forward over the decoded inputs in batches of 32 (weights loaded before timing)."""
    from mmllm.modalities import load_encoder

    with runtime_for(precision):
        enc = load_encoder(role, ROLES[role][2], precision=precision)
    step = (lambda b: enc.embed(b, 128)) if role == "text" else enc.encode
    step(inputs[:2])  # weights and kernels ready, as prepare has them after its first batch
    t = time.perf_counter()
    for i in range(0, len(inputs), 32):
        step(inputs[i:i + 32])
    return time.perf_counter() - t


def measure_role(role: str, records: list[dict], tmp: Path, repeat: int) -> dict:
    """Items/s of prepare and of the bare encoder, per precision, and their ratio (prepare s / encoder s)."""
    path = manifest(tmp / f"{role}.csv", records, ROLES[role][0])
    inputs = distinct_inputs(role, records)
    for p in PRECISIONS:  # warm-up: oneDNN builds its kernels for each dtype and layout once per process
        prepare_seconds(role, manifest(tmp / f"{role}_warm.csv", records[:4], ROLES[role][0]), tmp / "warm", p)
    best = {p: {"prepare_s": float("inf"), "encoder_s": float("inf")} for p in PRECISIONS}
    for _ in range(repeat):
        for p in PRECISIONS:
            best[p]["prepare_s"] = min(best[p]["prepare_s"], prepare_seconds(role, path, tmp / f"{role}_{p}", p))
            best[p]["encoder_s"] = min(best[p]["encoder_s"], encoder_seconds(role, inputs, p))
    out = {"items": len(inputs), "records": len(records)}
    for p, b in best.items():
        out[p] = {"prepare_per_s": len(inputs) / b["prepare_s"], "encoder_per_s": len(inputs) / b["encoder_s"],
                  "prepare_vs_encoder": b["prepare_s"] / b["encoder_s"], **b}
    out["prepare_speedup"] = out["auto"]["prepare_per_s"] / out["fp32"]["prepare_per_s"]
    out["encoder_speedup"] = out["auto"]["encoder_per_s"] / out["fp32"]["encoder_per_s"]
    return out


def run(quick: bool) -> dict:
    import tempfile

    from mmllm import console
    from mmllm.encoders import resolve_precision

    console.set_quiet(True)
    sizes = {"image": 8, "audio": 8, "text": 16} if quick else {"image": 128, "audio": 96, "text": 256}
    repeat = 1 if quick else 2
    from mmllm.modalities import load_encoder

    result = {"auto_is": resolve_precision("auto"), "threads": __import__("torch").get_num_threads(),
              "image_runtime": load_encoder("image", ROLES["image"][2], precision="auto").runtime,
              "load_before": os.getloadavg(), "repeat": repeat}
    with tempfile.TemporaryDirectory() as tmp:
        for role, n in sizes.items():
            result[role] = measure_role(role, sample_records(n), Path(tmp), repeat)
    result["load_after"] = os.getloadavg()
    result["target"], result["met"] = TARGET, result["image"]["prepare_speedup"] >= 2.5
    return result


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    unit = {"image": "images", "audio": "clips", "text": "texts"}
    how = {role: r["auto_is"] for role in ROLES}
    if r.get("image_runtime", "torch") != "torch":
        how["image"] = f"{r['image_runtime']} fp32"
    rows = [f"| prepare {unit[role]}/s, --precision auto ({how[role]}) vs PyTorch fp32 | "
            f"{r[role]['auto']['prepare_per_s']:.1f} | {r[role]['fp32']['prepare_per_s']:.1f} | "
            f"{r[role]['prepare_speedup']:.2f} | {TARGET if role == 'image' else 'measured'} | "
            f"{r['met'] if role == 'image' else ''} |" for role in ROLES]
    figures = [f"- bare encoder {unit[role]}/s, auto vs fp32: {r[role]['auto']['encoder_per_s']:.1f} vs "
               f"{r[role]['fp32']['encoder_per_s']:.1f} ({r[role]['encoder_speedup']:.2f}x); prepare / encoder "
               f"time: auto {r[role]['auto']['prepare_vs_encoder']:.2f}, "
               f"fp32 {r[role]['fp32']['prepare_vs_encoder']:.2f}" for role in ROLES]
    figures.append(f"- precision benchmark: {r['threads']} threads, load average {r['load_before'][0]:.1f} before, "
                   f"{r['load_after'][0]:.1f} after (other processes share the cores)")
    return rows, figures


def main() -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer records, one run per precision")
    args = ap.parse_args()
    os.environ.setdefault("MMLLM_HOME", str(Path.home() / ".cache" / "mmllm"))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    result = run(args.quick)
    print(json.dumps(result, indent=2))
    rows, figures = report(result)
    print("\n".join(rows + figures), file=__import__("sys").stderr)


if __name__ == "__main__":
    main()
