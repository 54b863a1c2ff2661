"""A training step of the text model's top K layers over stored trunk states (`prepare --text-trunk-layers K`,
`finetune --train-text-layers K`) against a full fine-tuning step (`--no-freeze-text`), in the same run.

- data: sample_data's texts, four consecutive ones joined per record (about the length of a fortune), text only,
  prepared by this code with the embedded MiniLM (L = 6 layers) and `--precision auto` (bf16 states where the CPU
  runs bf16), once per K.
- step: what `mmllm finetune` does per batch of 32 (its Task and optimizer: forward, loss, backward, AdamW step),
  on the same records for every variant; variants alternate within each round (a busy machine slows them alike),
  the median of the rounds after one warm-up step. Threads: every core, as finetune chooses for a text model.
- target: step(K) / step(full) <= K / L + OVERHEAD, where OVERHEAD (0.05 of the full step) covers what a full step
  does not scale down: padding the stored states into a batch, the fusion and head, AdamW over them.
- size: the stored trunk states per record, as prepare measures and prints them.

Run alone: `python bench/text_layers.py [--quick]` prints the results JSON; `python bench/run.py --only text_layers`
also records it in bench/results.json and BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import SAMPLE, fmt

OVERHEAD = 0.05
KS = (1, 2)
TARGET = f"step(K) / step(full) <= K/L + {OVERHEAD} (K = {', '.join(map(str, KS))})"


def manifest(tmp: Path, n: int) -> Path:
    rows = list(csv.DictReader(open(SAMPLE, encoding="utf-8")))
    records = [{"id": f"t{i}", "text": " ".join(rows[(4 * i + j) % len(rows)]["text"] for j in range(4)),
                "label": rows[(4 * i) % len(rows)]["label"].split("-")[0]} for i in range(n)]
    path = tmp / "texts.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "text", "label"])
        writer.writeheader()
        writer.writerows(records)
    return path


def prepared(tmp: Path, source: Path, k: int) -> tuple[Path, dict]:
    from mmllm import preparation as prepare
    from mmllm.config import PrepareConfig

    out = tmp / f"k{k}"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        prepare.run(PrepareConfig(input=[str(source)], output=str(out), cache=False, text_trunk_layers=k))
    summary = json.loads(printed.getvalue().strip().splitlines()[-1])
    return out, summary


def task_of(data_dir: Path, options: dict):
    """The Task finetune builds (model, training table) and its optimizer."""
    from mmllm import loop
    from mmllm.config import FinetuneConfig
    from mmllm.features import load_prepared
    from mmllm.runtime import Dist
    from mmllm.tasks import build_task

    cfg = FinetuneConfig(prepared=str(data_dir), output="-", modalities="text", fusion="concat", **options)
    data, meta = load_prepared(data_dir)
    task = build_task(cfg, data, meta, ["text"], Dist())
    task.model.train()
    return task, loop.make_optimizer(task.model, cfg)


def step(task, optimizer, idx: list[int]) -> float:
    t = time.perf_counter()
    loss = task.model(task.train.batch(idx))["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def run(tmp: Path | None, quick: bool) -> dict:
    import torch

    from mmllm.console import set_quiet

    torch.manual_seed(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    rounds = 3 if quick else 8
    with tempfile.TemporaryDirectory() as folder:
        base = Path(tmp or folder)
        source = manifest(base, 96 if quick else 192)
        set_quiet(True)
        try:
            data = {k: prepared(base, source, k) for k in KS}
            variants = {"full": task_of(data[KS[0]][0], {"freeze_text": False}),
                        **{f"top {k}": task_of(data[k][0], {"train_text_layers": k}) for k in KS},
                        "frozen": task_of(data[KS[0]][0], {"freeze_text": True})}
        finally:
            set_quiet(False)
        meta = json.loads((data[KS[0]][0] / "mmllm-prepared.json").read_text())
        first = variants["full"][0].train
        idx = list(range(min(32, len(first))))
        tokens = statistics.mean(first.lengths[i] for i in idx)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for task, opt in variants.values():
            step(task, opt, idx)  # warm-up: first-call allocations
        for _ in range(rounds):
            for name, (task, opt) in variants.items():
                times[name].append(step(task, opt, idx))
    layers = meta["text_trunk"]["layers"]
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {k: median[f"top {k}"] / median["full"] for k in KS}
    return {"cores": cores, "rounds": rounds, "batch": len(idx), "mean_tokens": round(tokens, 1),
            "layers": layers, "dtype": meta["text_trunk"]["dtype"], "load": round(os.getloadavg()[0], 2),
            "step_s": {name: round(v, 4) for name, v in median.items()},
            "ratio": {str(k): round(r, 3) for k, r in ratios.items()},
            "bound": {str(k): round(k / layers + OVERHEAD, 3) for k in KS},
            "bytes_per_record": {str(k): data[k][1]["text_trunk_bytes_per_record"] for k in KS},
            "target": TARGET, "met": all(ratios[k] <= k / layers + OVERHEAD for k in KS)}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    k = str(KS[0])
    rows = [f"| text model: a training step of its top {k} of {r['layers']} layers over stored trunk states "
            f"(batch {r['batch']}, {r['mean_tokens']:.0f} tokens) | {r['step_s']['top ' + k]:.3f} s | full "
            f"fine-tuning step {r['step_s']['full']:.3f} s | {fmt(r['ratio'][k], '.3f')} (bound "
            f"{r['bound'][k]:.3f}) | {TARGET} | {r['met']} |"]
    lines = [f"- text_layers ({r.get('date', 'this run')}, {r['cores']} threads, load {r['load']}): step of the top "
             + ", ".join(f"{k} layer{'s' if k != '1' else ''} {r['step_s']['top ' + k]:.3f} s ({r['ratio'][k]:.3f} "
                         f"of full, bound {r['bound'][k]:.3f})" for k in r["ratio"])
             + f"; full fine-tuning {r['step_s']['full']:.3f} s; frozen (pooled states) {r['step_s']['frozen']:.4f} s;"
             f" stored trunk states {', '.join(f'{b:,}' for b in r['bytes_per_record'].values())} bytes per record "
             f"({r['dtype']}, {r['mean_tokens']:.0f} tokens x 384 values)"]
    return rows, lines


def main() -> None:
    print(json.dumps(run(None, "--quick" in sys.argv), indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
