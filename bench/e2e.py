"""End to end: a 2,400-record image + question classification set (1,000 distinct images) from raw files to test
metrics with the defaults, the feature cache cold, each step's wall time.

- data (not timed): 1,000 PNG images of 96x96 px, each one shape (circle, square, triangle) in one colour (red,
  green, blue, yellow) at a random place and size on a grey background; 2,400 records, each an image and one
  of three questions ("what colour is the shape?", "what shape is it?", "is the shape red?") labelled with the
  answer (9 classes); split column 70/15/15.
- steps, each a `mmllm` command with its defaults, in a fresh MMLLM_HOME whose models/ is the installed one (so
  no feature is cached): prepare, finetune, eval model on the test split.
- the target: the three steps together in <= 60 s on 2 cores.

Run alone: `python bench/e2e.py [--quick]` prints the results JSON; `python bench/run.py --only e2e` also records
it in bench/results.json and BENCHMARKS.md.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import mmllm_exe

TARGET = "prepare + finetune + eval <= 60 s, cold feature cache"
COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = ("what colour is the shape?", "what shape is it?", "is the shape red?")


def make_data(folder: Path, n_images: int, n_records: int, seed: int = 0) -> Path:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    facts = []
    for i in range(n_images):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        img = Image.new("RGB", (96, 96), (rng.randint(90, 160),) * 3)
        size = rng.randint(24, 60)
        x, y = rng.randint(0, 96 - size), rng.randint(0, 96 - size)
        draw = ImageDraw.Draw(img)
        box = (x, y, x + size, y + size)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=COLOURS[colour])
        img.save(folder / "images" / f"{i}.png")
        facts.append((colour, shape))
    rows = []
    for r in range(n_records):
        i = r % n_images if r < n_images else rng.randrange(n_images)
        q = rng.randrange(len(QUESTIONS))
        colour, shape = facts[i]
        answer = [colour, shape, "yes" if colour == "red" else "no"][q]
        u = rng.random()
        rows.append({"id": f"q{r}", "image": f"images/{i}.png", "text": QUESTIONS[q], "label": answer,
                     "split": "train" if u < 0.7 else "validation" if u < 0.85 else "test"})
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder / "manifest.csv"


def step(args: list[str], env: dict, cwd: Path) -> tuple[float, dict, str]:
    t = time.perf_counter()
    r = subprocess.run([mmllm_exe(), *args], capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(f"mmllm {args[0]} failed: {r.stderr[-2000:]}")
    lines = [x for x in r.stdout.splitlines() if x.strip().startswith("{")]
    return wall, json.loads(lines[-1]) if lines else {}, r.stderr


def run(tmp: Path | None, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(tmp or folder) / "e2e"
        n_images, n_records = (100, 240) if quick else (1000, 2400)
        manifest = make_data(base, n_images, n_records)
        home = base / "home"
        home.mkdir()
        models = Path(os.environ.get("MMLLM_HOME", Path.home() / ".cache" / "mmllm")) / "models"
        (home / "models").symlink_to(models.resolve())
        env = {**{k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}, "MMLLM_HOME": str(home)}
        load = os.getloadavg()[0]
        steps: dict = {}
        wall, summary, log = step(["prepare", str(manifest), "--output", "p"], env, base)
        steps["prepare"] = {"wall_s": round(wall, 2), "seconds_inside": summary.get("seconds"),
                            "counts": summary.get("counts"), "log": [x for x in log.splitlines()
                                                                     if x.startswith(("features:", "frozen"))]}
        wall, summary, log = step(["finetune", "p", "--output", "ck"], env, base)
        steps["finetune"] = {"wall_s": round(wall, 2), "steps": summary.get("steps"), "epochs": summary.get("epochs"),
                             "kept": summary.get("kept"), "records_per_s": summary.get("train_records_per_s"),
                             "stop_reason": summary.get("stop_reason"),
                             "threads": next((x for x in log.splitlines() if x.startswith("threads:")), None)}
        wall, summary, _ = step(["eval", "model", "ck", "p", "--no-reliance"], env, base)
        steps["eval"] = {"wall_s": round(wall, 2), "n": summary.get("n"), "accuracy": summary.get("accuracy"),
                         "macro_f1": summary.get("macro_f1")}
    total = sum(s["wall_s"] for s in steps.values())
    return {"records": n_records, "images": n_images, "steps": steps, "total_s": round(total, 2),
            "load_before": load, "load_after": os.getloadavg()[0], "target": TARGET, "met": total <= 60}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    s = r["steps"]
    rows = [f"| end to end, {r['records']} image + question records ({r['images']} images), cold cache | "
            f"{r['total_s']:.1f} s (prepare {s['prepare']['wall_s']:.1f}, finetune {s['finetune']['wall_s']:.1f}, "
            f"eval {s['eval']['wall_s']:.1f}), test accuracy {s['eval']['accuracy']:.3f} | - | - | {TARGET} | "
            f"{r['met']} |"]
    lines = [f"- end to end ({r.get('date', 'this run')}, load average {r['load_before']:.1f} before, "
             f"{r['load_after']:.1f} after): finetune {s['finetune']['steps']} steps in {s['finetune']['epochs']} "
             f"epochs at {s['finetune']['records_per_s']} records/s, kept {s['finetune']['kept']} "
             f"({s['finetune']['stop_reason']}); prepare {s['prepare']['log']}"]
    return rows, lines


def main() -> None:
    print(json.dumps(run(None, "--quick" in sys.argv), indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
