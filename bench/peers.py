"""mmllm's defaults against peers on the same real data, in one run (issue 16, point 4). Run by hand; not in CI,
not in bench/run.py:

    .venv/bin/python bench/peers.py                          1000 training records: writes bench/peers.json and
                                                             bench/PEERS.md (the section for BENCHMARKS.md)
    .venv/bin/python bench/peers.py --train 300 --out DIR    a smaller run, written under DIR instead

Data: the quality suite's digits_match (bench/quality_data.py, built under the work folder): a handwritten digit
image, a spoken digit (five voices, five languages) and the label same/different. `prepare --transcribe` adds
whisper-tiny.en's transcript of the audio, fed to the text model: an image + text (+ audio features) task.

- mmllm: `prepare MANIFEST --transcribe --no-cache` (every feature computed from the raw files), `finetune` with
  no tuning flag, `eval model --split test --no-reliance` (the metrics of the default eval, without its extra
  masked passes that no peer makes). Wall time = the three commands.
- transformers.Trainer: the same text model (the folder of the prepared data's encoders.text), fine-tuned on the
  prepared `transcript` column, mean-pooled and concatenated with the same frozen `image_emb` and `audio_emb`,
  then a 256-unit MLP head. TrainingArguments at their defaults except output_dir, batch size 32, evaluation and
  checkpoint selection on the validation split each epoch (load_best_model_at_end, on eval_loss), report_to none,
  use_cpu. Wall time = mmllm's prepare (the features it trains on) + the peer's process: load, tokenize, train,
  predict test.
- Ludwig: `pip install ludwig` into a venv under the work folder with a constraints file `torch==2.13.0` (a bare
  torch requirement pulls ~3 GB of CUDA), time-boxed; then `ludwig experiment` with Ludwig's default encoders for
  a text (transcript), an image (file path) and an audio (file path) feature, same splits. Where it cannot run,
  the decisive error line and the command are recorded instead of numbers.
Every process runs with OMP_NUM_THREADS=1 unless the caller sets it. The machine has 2 cores shared with other
work: times are noisy.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (sets OMP_NUM_THREADS=1 unless given)
import quality_data  # noqa: E402
from common import ROOT, publish, versions  # noqa: E402

JSON_OUT, MD_OUT = ROOT / "bench" / "peers.json", ROOT / "bench" / "PEERS.md"
DATASET = "digits_match"
BATCH = 32
HEAD_HIDDEN = 256
LUDWIG_CONSTRAINTS = "torch==2.13.0\n"
LUDWIG_STACK = ("ludwig", "torch", "torchvision", "torchaudio", "transformers")  # the versions pip resolved
TRAINER_ARGS = ("output_dir", "per_device_train_batch_size=32", "per_device_eval_batch_size=32",
                "eval_strategy=epoch", "save_strategy=epoch", "load_best_model_at_end=True", "report_to=none",
                "use_cpu=True")  # everything else at transformers' defaults (the report lists them)


# ---------------------------------------------------------------- mmllm

def run_mmllm(manifest: Path, work: Path, log: Path) -> dict:
    """prepare --transcribe (no feature cache), finetune with the defaults, eval model on test."""
    prepared = work / "prepared"
    prep, prep_s = quality.mmllm(["prepare", str(manifest), "--transcribe", "--no-cache", "--output", str(prepared),
                                  "--overwrite"], log)
    res = quality.train_and_eval("defaults", prepared, work, [], log)
    total = prep_s + res["finetune_s"] + res["eval_s"]
    return {**res, "prepare_s": round(prep_s, 1), "wall_s": round(total, 1), "counts": prep.get("counts"),
            "transcripts": prep.get("transcripts"), "prepared": str(prepared)}


# ---------------------------------------------------------------- transformers.Trainer

def trainer_records(split, tokenizer, max_tokens: int) -> list[dict]:
    """One dict per record: the transcript's token ids, the frozen image + audio features, the label id."""
    import numpy as np

    part = split.with_format("numpy", columns=["image_emb", "audio_emb"])
    media = np.concatenate([part["image_emb"], part["audio_emb"]], axis=1).astype(np.float32)  # (N, 1280 + 384)
    texts = [t or "" for t in split["transcript"]]
    enc = tokenizer(texts, truncation=True, max_length=max_tokens)
    return [{"input_ids": ids, "attention_mask": mask, "media": media[i], "labels": label}
            for i, (ids, mask, label) in enumerate(zip(enc["input_ids"], enc["attention_mask"], split["label"]))]


def transcript_model(folder: Path, media_dim: int, num_labels: int):
    """The model a transformers user writes for this data: the text model over the transcript, mean-pooled,
    concatenated with the frozen media features, then a small MLP head."""
    import torch
    from transformers import AutoModel
    from transformers.modeling_outputs import SequenceClassifierOutput

    class TranscriptAndMedia(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = AutoModel.from_pretrained(folder, dtype=torch.float32)
            dim = self.text.config.hidden_size + media_dim
            self.head = torch.nn.Sequential(torch.nn.Linear(dim, HEAD_HIDDEN), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                            torch.nn.Linear(HEAD_HIDDEN, num_labels))

        def forward(self, input_ids, attention_mask, media, labels=None):
            states = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
            logits = self.head(torch.cat([pooled, media], dim=-1))  # (B, labels)
            loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=logits)

    return TranscriptAndMedia()


def collate(tokenizer):
    """Pad the token ids, stack the media features and labels."""
    import numpy as np
    import torch

    def batch(records: list[dict]) -> dict:
        out = tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in records], return_tensors="pt")
        out["media"] = torch.from_numpy(np.stack([r["media"] for r in records]))
        out["labels"] = torch.tensor([int(r["labels"]) for r in records])
        return dict(out)

    return batch


def run_trainer_peer(prepared: Path, work: Path) -> dict:
    """transformers.Trainer on mmllm's prepared features (this runs in its own process; see trainer_peer)."""
    import numpy as np
    from transformers import AutoTokenizer, Trainer, TrainingArguments, set_seed

    from mmllm.encoders import resolve
    from mmllm.features import load_prepared

    t0 = time.perf_counter()
    data, meta = load_prepared(prepared)
    folder, _ = resolve(meta["encoders"]["text"]["name"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    max_tokens = meta["preprocessing"]["max_text_tokens"]
    splits = {s: trainer_records(data[s], tokenizer, max_tokens) for s in ("train", "validation", "test")}
    set_seed(42)  # TrainingArguments' default seed, also for the head's initialization
    model = transcript_model(folder, len(splits["train"][0]["media"]), len(meta["labels"]))
    args = TrainingArguments(output_dir=str(work / "trainer"), per_device_train_batch_size=BATCH,
                             per_device_eval_batch_size=BATCH, eval_strategy="epoch", save_strategy="epoch",
                             load_best_model_at_end=True, report_to="none", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=splits["train"], eval_dataset=splits["validation"],
                      data_collator=collate(tokenizer))
    t_train = time.perf_counter()
    trainer.train()
    t_pred = time.perf_counter()
    pred = trainer.predict(splits["test"])
    y_pred = np.argmax(pred.predictions, axis=-1).tolist()
    y_true = [int(r["labels"]) for r in splits["test"]]
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    return {**quality.scores(y_true, y_pred), "n": len(y_true), "load_s": round(t_train - t0, 1),
            "train_s": round(t_pred - t_train, 1), "predict_s": round(time.perf_counter() - t_pred, 1),
            "epochs": args.num_train_epochs, "learning_rate": args.learning_rate, "steps": trainer.state.global_step,
            "best_checkpoint": Path(trainer.state.best_model_checkpoint or "").name,
            "val_loss": [round(e["eval_loss"], 4) for e in evals]}


def trainer_peer(mm: dict, work: Path, log: Path) -> dict:
    """run_trainer_peer in a fresh process (its imports count, as mmllm's do); wall = mmllm's prepare + it."""
    t, start = time.perf_counter(), log.stat().st_size if log.is_file() else 0
    with open(log, "a") as err:
        proc = subprocess.run([sys.executable, __file__, "--trainer-peer", mm["prepared"], "--work", str(work)],
                              stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        with open(log, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            return {"error": f"exit {proc.returncode}: {decisive_line(f.read())}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**res, "process_s": round(seconds, 1), "wall_s": round(mm["prepare_s"] + seconds, 1),
            "arguments": list(TRAINER_ARGS)}


# ---------------------------------------------------------------- Ludwig

def decisive_line(output: str) -> str:
    """Why a command failed, in one line: the last exception line of a traceback, else the last ERROR line, else
    the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for pattern in (r"^[\w.]*(Error|Exception|Exit|Interrupt)\b", r"^ERROR\b"):
        hits = [line for line in lines if re.match(pattern, line)]
        if hits:
            return hits[-1][:400]
    return lines[-1][:400] if lines else "(no output)"


def step(cmd: list[str], timeout: float, log: Path, cwd: Path) -> dict:
    """Run one command with a time limit: ok, seconds, and on failure the decisive line of its output."""
    t = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                  cwd=cwd)
        except subprocess.TimeoutExpired:
            return {"ok": False, "seconds": round(time.perf_counter() - t, 1),
                    "error": f"timed out after {timeout:.0f} s"}
        out.write(proc.stdout)
    res = {"ok": proc.returncode == 0, "seconds": round(time.perf_counter() - t, 1)}
    return res if res["ok"] else {**res, "error": f"exit {proc.returncode}: {decisive_line(proc.stdout)}"}


def installed_versions(python: Path, names: tuple[str, ...]) -> dict:
    """name -> version installed beside `python` (None where missing), read without importing the packages."""
    probe = ("import importlib.metadata as m, json, sys\n"
             "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
             "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    proc = subprocess.run([str(python), "-c", probe, *names], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def ludwig_install(venv: Path, timeout: float, log: Path) -> dict:
    """`pip install ludwig` into its own venv, torch held at the CPU build by a constraints file."""
    constraints = venv.parent / "ludwig-constraints.txt"
    constraints.write_text(LUDWIG_CONSTRAINTS)
    pip = [str(venv / "bin" / "pip"), "install", "-c", str(constraints), "ludwig"]
    if (venv / "bin" / "ludwig").is_file():
        res = {"ok": True, "seconds": None, "reused": True}
    else:
        res = step([sys.executable, "-m", "venv", str(venv)], 120, log, venv.parent)
        if res["ok"]:
            start = time.perf_counter()
            res = step(pip, max(1.0, timeout - res["seconds"]), log, venv.parent)
            res["seconds"] = round(time.perf_counter() - start, 1)
    if res["ok"]:
        res["versions"] = installed_versions(venv / "bin" / "python", LUDWIG_STACK)
    return {**res, "command": " ".join(["pip", *pip[1:]]).replace(str(venv.parent) + "/", "")}


def ludwig_inputs(manifest: Path, prepared: Path, work: Path) -> tuple[Path, Path]:
    """(dataset CSV, config) for `ludwig experiment`: mmllm's transcripts, the raw image and audio files, the
    same splits (Ludwig's fixed split: 0 train, 1 validation, 2 test); Ludwig's default encoders."""
    from mmllm.features import load_prepared

    data, _ = load_prepared(prepared)
    transcripts = {r["id"]: r["transcript"] or "" for s in data for r in data[s].select_columns(["id", "transcript"])}
    split_ids = {"train": 0, "validation": 1, "test": 2}
    rows = [{"transcript": transcripts.get(r["id"], ""), "image": r["image"], "audio": r["audio"],
             "label": r["label"], "split": split_ids[r["split"]]}
            for r in csv.DictReader(open(manifest, encoding="utf-8"))]
    dataset = quality_data.write_manifest(work / "ludwig-data.csv", rows)
    config = {"input_features": [{"name": "transcript", "type": "text"}, {"name": "image", "type": "image"},
                                 {"name": "audio", "type": "audio"}],
              "output_features": [{"name": "label", "type": "category"}],
              "preprocessing": {"split": {"type": "fixed", "column": "split"}}}
    path = work / "ludwig-config.yaml"
    path.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    return dataset, path


def ludwig_scores(results: Path) -> dict:
    """Test accuracy and macro-F1 of the label from Ludwig's test_statistics.json."""
    runs = sorted(results.glob("experiment_run*/test_statistics.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return {"error": f"no test_statistics.json under {results}"}
    stats = json.loads(runs[-1].read_text())["label"]
    return {"accuracy": stats["accuracy"], "macro_f1": stats.get("overall_stats", {}).get("avg_f1_score_macro")}


def run_ludwig(manifest: Path, prepared: Path, work: Path, log: Path, timeout: float) -> dict:
    """Install Ludwig, then `ludwig experiment` on the same data: scores and wall time, or why it could not run."""
    out: dict = {"install": ludwig_install(work / "ludwig-venv", timeout, log)}
    if not out["install"]["ok"]:
        return out
    dataset, config = ludwig_inputs(manifest, prepared, work)
    cmd = [str(work / "ludwig-venv" / "bin" / "ludwig"), "experiment", "--config", config.name, "--dataset",
           dataset.name, "--output_directory", "ludwig-results"]
    out["experiment"] = {**step(cmd, timeout, log, work), "command": " ".join(["ludwig", *cmd[1:]])}
    if out["experiment"]["ok"]:
        out["experiment"].update(ludwig_scores(work / "ludwig-results"))
        out["wall_s"] = out["experiment"]["seconds"]
    return out


# ---------------------------------------------------------------- the run and its report

def run(work: Path, n_train: int, n_eval: int, ludwig_timeout: float, ludwig: bool = True) -> dict:
    """Build the data under `work`, then mmllm, the Trainer peer and (unless ludwig=False) Ludwig, one after the
    other on the same splits."""
    t = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "peers.log"
    manifest = quality_data.build(DATASET, work / "data", n_train, n_eval)
    results = {"date": datetime.date.today().isoformat(), "versions": versions(), "dataset": DATASET,
               "train": n_train, "eval": n_eval}
    results["mmllm"] = run_mmllm(manifest, work, log)
    print(f"mmllm: {json.dumps(results['mmllm'])}", file=sys.stderr)
    results["trainer"] = trainer_peer(results["mmllm"], work, log)
    print(f"trainer: {json.dumps(results['trainer'])}", file=sys.stderr)
    if ludwig:
        results["ludwig"] = run_ludwig(manifest, Path(results["mmllm"]["prepared"]), work, log, ludwig_timeout)
        print(f"ludwig: {json.dumps(results['ludwig'])}", file=sys.stderr)
    results["total_s"] = round(time.perf_counter() - t, 1)
    return results


def cells(r: dict) -> str:
    """'accuracy / macro-F1' in percent, or why there is none."""
    if "accuracy" not in r:
        return "-"
    return f"{quality.pct(r['accuracy'])} / {quality.pct(r.get('macro_f1'))}"


def ludwig_row(lw: dict | None) -> str:
    if lw is None:
        return "| Ludwig | not run (--no-ludwig) | - | - | |"
    inst, exp = lw["install"], lw.get("experiment")
    stack = inst.get("versions") or {}
    name = f"Ludwig {stack.get('ludwig') or ''}".strip()
    what = "`ludwig experiment`, Ludwig's default encoders for a text (transcript), an image and an audio file"
    if not inst["ok"]:
        return f"| {name} | {what}: could not install | - | - | `{inst['command']}` failed: `{inst['error']}` |"
    installed = ", ".join(f"{k} {v}" for k, v in stack.items() if k != "ludwig")
    installed += "; venv reused" if inst.get("reused") else f"; `{inst['command']}` took {inst['seconds']} s"
    if not exp["ok"] or "accuracy" not in exp:
        return (f"| {name} | {what}: could not run | - | - | installed ({installed}); `{exp['command']}` failed "
                f"after {exp['seconds']} s: `{exp.get('error', '')}` |")
    return (f"| {name} | {what} | {exp['seconds']} (+ the transcription in mmllm's prepare) | {cells(exp)} | "
            f"installed ({installed}) |")


def markdown(results: dict) -> str:
    """The BENCHMARKS.md section of a run."""
    v, mm, tr = results["versions"], results["mmllm"], results["trainer"]
    counts = mm.get("counts") or {}
    lines = [f"## Against peers ({results['dataset']} with transcripts)", "",
             f"Measured {results['date']} on {v['machine']} (python {v['python']}, torch {v['torch']}, transformers "
             f"{v['transformers']}), "
             f"{counts.get('train')} / {counts.get('validation')} / {counts.get('test')} train / validation / test "
             f"records of the quality suite's {results['dataset']}, {results['total_s']:.0f} s in all. Regenerate by "
             "hand with `python bench/peers.py` (not part of `make bench`). One thread per process "
             "(OMP_NUM_THREADS=1); the 2 cores were shared with other work, so times are noisy.", "",
             "| tool | what runs | wall time from raw files to test metrics (s) | test accuracy / macro-F1 | notes |",
             "|---|---|---|---|---|",
             f"| mmllm defaults | `prepare --transcribe --no-cache`, `finetune`, `eval model --split test` | "
             f"{mm['wall_s']} (prepare {mm['prepare_s']}, finetune {mm['finetune_s']}, eval {mm['eval_s']}) | "
             f"{cells(mm)} | {mm.get('epochs')} epochs ({mm.get('steps')} steps), {mm.get('stop_reason')} |"]
    if "error" in tr:
        lines.append(f"| transformers.Trainer | failed | - | - | {tr['error']} |")
    else:
        lines.append(f"| transformers.Trainer | the same text model fine-tuned on the transcript, mean-pooled, + the "
                     f"same frozen image and audio features, {HEAD_HIDDEN}-unit MLP head; default TrainingArguments "
                     f"({tr['epochs']:g} epochs, lr {tr['learning_rate']:g}) except batch 32 and best-of-epochs on "
                     f"validation loss | {tr['wall_s']} (mmllm's prepare {mm['prepare_s']} + load {tr['load_s']}, "
                     f"train {tr['train_s']}, predict {tr['predict_s']}) | {cells(tr)} | {tr['steps']} steps, kept "
                     f"{tr['best_checkpoint']}; validation loss per epoch {tr['val_loss']} |")
    lines.append(ludwig_row(results.get("ludwig")))
    lines += ["", "Cells are percent on the same test split. The Trainer peer trains on the features of mmllm's "
              "prepare (same transcripts, same frozen image and audio encoders), so its wall time includes that "
              "prepare.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=1000, help="training records (at most)")
    ap.add_argument("--eval", type=int, default=150, help="validation and test records each (at most)")
    ap.add_argument("--out", type=Path, help="write peers.json and PEERS.md here, not the tracked files")
    ap.add_argument("--work", type=Path, help="keep data, prepared features, checkpoints, the Ludwig venv and logs "
                                              "here (default: a temp dir)")
    ap.add_argument("--ludwig-timeout", type=float, default=600, help="seconds for Ludwig's install, and again for "
                                                                      "its experiment")
    ap.add_argument("--no-ludwig", action="store_true", help="leave Ludwig out")
    ap.add_argument("--trainer-peer", type=Path, help=argparse.SUPPRESS)  # internal: the Trainer peer's process
    args = ap.parse_args(argv)
    if args.trainer_peer:
        print(json.dumps(run_trainer_peer(args.trainer_peer, args.work)))
        return
    with tempfile.TemporaryDirectory(prefix="mmllm-peers-") as tmp:
        work = args.work or Path(tmp)
        print(f"work folder: {work}", file=sys.stderr)
        results = run(work, args.train, args.eval, args.ludwig_timeout, not args.no_ludwig)
    publish(results, args.out, (JSON_OUT, MD_OUT), markdown)


if __name__ == "__main__":
    main()
