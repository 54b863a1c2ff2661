"""The default finetune on a machine that is doing something else too: the same run with and without one busy
background process (a bounded CPU loop this benchmark starts and stops), in the same run.

- data: sample_data prepared by this code (480 records, no transcripts; the feature cache may serve it).
- runs: `mmllm finetune` with its defaults (threads chosen for the work: one for the fusion candidates over
  stored features), idle and busy; the same with `--threads N` = every core (the previous default) and
  `--epochs` fixed so that its two runs do the same steps (with two threads the numbers differ in the last bits,
  and so does early stopping).
- figures: wall seconds of the command and training records/s (finetune's `train_records_per_s`); slowdown =
  idle records/s / busy records/s; the load average (1 min) before each run, since other work shares the machine.

Run alone: `python bench/busy_finetune.py [--quick]` prints the results JSON; `python bench/run.py --only busy` also
records it in bench/results.json and BENCHMARKS.md.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SAMPLE, fmt, mmllm_exe, quiet_stdout, write_manifest

TARGET = "default finetune records/s idle / with one busy process <= 2.5"
LIMIT_S = 900  # the busy loop ends by itself after this, should the benchmark die


def prepared(tmp: Path, n: int) -> Path:
    from mmllm import preparation as prepare
    from mmllm.config import PrepareConfig

    manifest = write_manifest(tmp / "sample.csv", list(csv.DictReader(open(SAMPLE, encoding="utf-8")))[:n])
    with quiet_stdout():
        prepare.run(PrepareConfig(input=[str(manifest)], output=str(tmp / "sample"), transcribe=False))
    return tmp / "sample"


def busy_loop() -> subprocess.Popen:
    """One process that keeps a core busy (pure Python arithmetic) for at most LIMIT_S seconds."""
    code = f"import time\nend = time.time() + {LIMIT_S}\nx = 0\nwhile time.time() < end:\n    x += 1\n"
    return subprocess.Popen([sys.executable, "-c", code])


def finetune(data: Path, out: Path, extra: list[str], busy: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the choice is finetune's own
    loop = busy_loop() if busy else None
    try:
        if loop:
            time.sleep(1.0)  # the loop is running before finetune starts
        load = os.getloadavg()[0]
        t = time.perf_counter()
        r = subprocess.run([mmllm_exe(), "finetune", str(data), "--output", str(out), "--overwrite", *extra],
                           capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
    finally:
        if loop:
            loop.kill()
            loop.wait()
    if r.returncode:
        raise RuntimeError(f"finetune failed: {r.stderr[-2000:]}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    threads = next((line for line in r.stderr.splitlines() if line.startswith("threads:")), None)
    return {"wall_s": round(wall, 2), "records_per_s": summary["train_records_per_s"], "steps": summary["steps"],
            "epochs": summary["epochs"], "load_before": round(load, 2), "threads_line": threads}


def run(tmp: Path | None, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(tmp or folder)
        data = prepared(base, 96 if quick else 480)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        variants = {"default": [], f"--threads {cores}": ["--threads", str(cores), "--epochs", "1" if quick else "5"]}
        if quick:
            variants["default"] = ["--epochs", "2"]
        out: dict = {"cores": cores, "busy_processes": 1, "runs": {}}
        for name, extra in variants.items():
            idle = finetune(data, base / "ck", extra, busy=False)
            busy = finetune(data, base / "ck", extra, busy=True)
            out["runs"][name] = {"idle": idle, "busy": busy,
                                 "slowdown": idle["records_per_s"] / busy["records_per_s"]}
    d = out["runs"]["default"]
    out["met"] = d["slowdown"] <= 2.5 and d["idle"]["steps"] == d["busy"]["steps"]
    return out


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    d = r["runs"]["default"]
    rows = [f"| default finetune with one busy process (sample_data, {d['idle']['steps']} steps) | "
            f"{d['busy']['records_per_s']:.0f} records/s, {d['busy']['wall_s']:.1f} s (load "
            f"{d['busy']['load_before']:.1f}) | "
            f"idle {d['idle']['records_per_s']:.0f} records/s, {d['idle']['wall_s']:.1f} s (load "
            f"{d['idle']['load_before']:.1f}) | {fmt(d['slowdown'], '.2f')}x | {TARGET} | {r['met']} |"]
    lines = []
    for name, v in r["runs"].items():
        lines.append(f"- finetune {name} ({r.get('date', 'this run')}): idle {v['idle']['records_per_s']:.0f} "
                     f"records/s ({v['idle']['steps']} steps, {v['idle']['wall_s']:.1f} s, load "
                     f"{v['idle']['load_before']:.1f}), one busy process {v['busy']['records_per_s']:.0f} records/s "
                     f"({v['busy']['steps']} steps, {v['busy']['wall_s']:.1f} s, load {v['busy']['load_before']:.1f}):"
                     f" slowdown {v['slowdown']:.2f}x; {v['idle']['threads_line']}")
    return rows, lines


def main() -> None:
    print(json.dumps(run(None, "--quick" in sys.argv), indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
