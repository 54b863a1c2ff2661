"""What every benchmark shares: timing, running a command with its peak memory, sample manifests, the report."""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "manifest.csv"
NOTES = ROOT / "bench" / "NOTES.md"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------- timing

def median_time(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of `repeat` calls of fn, in seconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def quotient(a: float, b: float) -> float | None:
    """a / b, or None when b is not a positive finite number (the report then prints n/a)."""
    return a / b if b > 0 and math.isfinite(b) else None


def slope(ns: list[float], ts: list[float]) -> float:
    """Log-log slope of ts against ns (1.0 = linear)."""
    import numpy as np

    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


class quiet_stdout:
    """Send stdout (mmllm's JSON results) to /dev/null while in-process commands run."""

    def __enter__(self):
        self.saved, sys.stdout = sys.stdout, open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self.saved


# ---------------------------------------------------------------- commands

def mmllm_exe() -> str:
    return str(Path(sys.executable).with_name("mmllm"))


def run_cmd(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (the peak resident set so far) of a live process, in MiB; 0 once it is gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure(cmd: list[str], stdin_path: Path | None = None) -> dict:
    """Run a command: wall time, times of its first and last stdout lines, peak RSS (VmHWM, polled), line count."""
    t = time.perf_counter()
    with open(stdin_path or os.devnull) as stdin:
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                cwd=ROOT)
        peak = [0.0]

        def watch():
            while proc.poll() is None:
                peak[0] = max(peak[0], peak_rss_mb(proc.pid))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        stamps = [time.perf_counter() - t for _ in iter(proc.stdout.readline, "")]
        proc.wait()
        watcher.join()
    return {"wall_s": time.perf_counter() - t, "first_line_s": stamps[0] if stamps else None,
            "last_line_s": stamps[-1] if stamps else None, "peak_rss_mb": peak[0], "lines": len(stamps),
            "returncode": proc.returncode}


# ---------------------------------------------------------------- inputs

ENCODERS = {"text": "minilm", "image": "efficientnet-lite0", "audio": "whisper-tiny.en"}  # the embedded models


@functools.cache
def encoder(role: str, precision: str = "fp32"):
    """The embedded encoder of a role whose frozen forward runs in `precision` (fp32, bf16: as resolved, never
    auto), loaded once per run and shared by the benchmarks; text's build_model() gives a fresh model each call."""
    from mmllm.modalities import load_encoder

    return load_encoder(role, ENCODERS[role], precision=precision)


@contextlib.contextmanager
def torch_image_runtime():
    """Image encoders loaded inside run in PyTorch, not OpenVINO (MMLLM_IMAGE_RUNTIME=torch): FlopCounterMode sees
    only PyTorch ops, so the FLOPs of an OpenVINO forward are counted on the same network run in PyTorch."""
    keep = os.environ.get("MMLLM_IMAGE_RUNTIME")
    os.environ["MMLLM_IMAGE_RUNTIME"] = "torch"
    try:
        yield
    finally:
        if keep is None:
            del os.environ["MMLLM_IMAGE_RUNTIME"]
        else:
            os.environ["MMLLM_IMAGE_RUNTIME"] = keep


@contextlib.contextmanager
def openvino_text_from_the_start():
    """The text encoder as a large prepare runs it: in OpenVINO (where it applies) from the first token, not after
    its first mmllm.encoders.OPENVINO_AFTER_TOKENS."""
    import mmllm.encoders as E

    keep = E.OPENVINO_AFTER_TOKENS
    E.OPENVINO_AFTER_TOKENS = 0
    try:
        yield
    finally:
        E.OPENVINO_AFTER_TOKENS = keep


def sample_records(n: int) -> list[dict]:
    """n records cycling through sample_data (ids made unique); n <= 480 keeps every image a distinct file."""
    rows = list(csv.DictReader(open(SAMPLE, encoding="utf-8")))
    return [dict(rows[i % len(rows)], id=f"{rows[i % len(rows)]['id']}_{i}") for i in range(n)]


def write_manifest(path: Path, records: list[dict]) -> Path:
    """A CSV manifest of records whose media paths are made absolute."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        for r in records:
            w.writerow({**r, "image": str(ROOT / "sample_data" / r["image"]),
                        "audio": str(ROOT / "sample_data" / r["audio"])})
    return path


# ---------------------------------------------------------------- report

def versions() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "platform": platform.platform()}


def fmt(value: float | None, spec: str) -> str:
    """A number for the report; n/a when it could not be measured."""
    return "n/a" if value is None else format(value, spec)


def markdown(results: dict, rows: list[str], figures: list[str]) -> str:
    """BENCHMARKS.md: the run's header, the table rows and other figures the benchmarks report, then NOTES.md."""
    v = results["versions"]
    lines = ["# Benchmarks", "", f"Measured {results['date']} on {v['machine']} (python {v['python']}, torch "
             f"{v['torch']}, transformers {v['transformers']}), mode: {results['mode']}. Every figure is a ratio "
             "against a baseline measured in the same run (medians where repeated). Regenerate with `make bench`.",
             "", "| benchmark | mmllm | baseline | ratio | target | met |", "|---|---|---|---|---|---|", *rows,
             "", "Other figures from the same run:", "", *figures, ""]
    if NOTES.is_file():
        lines += [NOTES.read_text().strip(), ""]
    return "\n".join(lines)


def publish(results: dict, out: Path | None, tracked: tuple[Path, Path], markdown: Callable[[dict], str]) -> None:
    """Write a by-hand suite's JSON and markdown: into `out` as NAME.json / NAME.md when given, else the tracked
    pair; then print the markdown."""
    json_out, md_out = (out / tracked[0].name, out / tracked[1].name) if out else tracked
    json_out.parent.mkdir(parents=True, exist_ok=True)
    write_text(json_out, json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    write_text(md_out, text)
    print(text)


def write_text(path: Path, text: str) -> None:
    """Write beside, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
