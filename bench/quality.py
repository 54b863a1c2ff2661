"""Quality suite on real data the project did not make (issue 15, point 4): `make quality`.

    python bench/quality.py                      every dataset, ~1000 training records each: writes
                                                 bench/quality.json and bench/QUALITY.md
    python bench/quality.py --dataset fortunes --train 300 --eval 100 --out DIR     a smaller run under DIR

For each dataset of bench/quality_data.py, in one run, on the same test split:
- majority: the most frequent training label, predicted for every test record;
- single modality: `mmllm finetune --modalities X` (defaults otherwise), one run per modality of the data;
- linear probe: scikit-learn logistic regression alone (C in 0.01..10, best on validation accuracy) on the
  standardized stored features below: what mmllm's defaults must never lose to;
- hand baseline: the frozen pooled features of the same encoders, read from the same prepared Arrow data (the
  text model's mean-pooled states `text_pooled` of the text and transcript, `image_emb`, `audio_emb`),
  standardized and concatenated, then scikit-learn logistic regression (C in 0.01..10) and a 1-hidden-layer MLP
  (256 units, alpha in 1e-4..1e-1); the model and setting best on validation accuracy is scored on test;
- mmllm defaults: `mmllm prepare`, `mmllm finetune` with no tuning flag, `mmllm eval model` on test.
- alternatives: the defaults' rivals (ALTERNATIVES: other fusions, `prepare --transcribe`), trained and scored the
  same way, so every default is a measured choice.
For the generation dataset: BLEU and chrF (sacreBLEU, `mmllm eval model`) of the untrained model (`--epochs 0`:
the projector at its initialization, the decoder as pretrained: a zero-shot baseline) and of the trained one, and
the nearest-neighbour retrieval baseline of the captioning literature: each test record gets the training target
of its most similar training record (cosine similarity of the same frozen pooled features as the hand baseline,
each block L2-normalised), scored with the same sacreBLEU.
Accuracy and macro-F1 of the baselines are scikit-learn's; mmllm's come from `mmllm eval model`.
Wall times are per step; the machine has 2 cores shared with other work, so they are noisy. Each command runs with
OMP_NUM_THREADS=1 unless the caller sets it (torch's 2 threads collapse when the other core is busy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_data  # noqa: E402
from common import ROOT, mmllm_exe, publish, versions  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads collapse when the other core is busy (shared machine)
JSON_OUT, MD_OUT = ROOT / "bench" / "quality.json", ROOT / "bench" / "QUALITY.md"
NOTES = ROOT / "bench" / "QUALITY_NOTES.md"  # hand-written reading of the results, appended to QUALITY.md
TASKS = {"digits_match": "classify", "digits_noise": "classify", "prompts": "generate", "fortunes": "classify",
         "emoji": "generate"}
MODALITIES = {"digits_match": ["image", "audio"], "digits_noise": ["image", "audio"], "fortunes": ["text"],
              "prompts": ["audio"], "emoji": ["image"]}
# the defaults' alternatives, run on the same data in the same run so each default is chosen from measurements:
# name -> (finetune flags, prepare flags); a variant with prepare flags prepares its own copy (media from the cache)
ALTERNATIVES = {"digits_match": {"fusion bilinear": (["--fusion", "bilinear"], []),
                                 "fusion concat": (["--fusion", "concat"], []),
                                 "fusion attention": (["--fusion", "attention"], []),
                                 "prepare --no-transcribe": ([], ["--no-transcribe"])},
                "digits_noise": {"fusion bilinear": (["--fusion", "bilinear"], [])},
                "fortunes": {"fusion bilinear": (["--fusion", "bilinear"], []),
                             "fusion concat": (["--fusion", "concat"], []),
                             "top 1 text layer trained": (["--train-text-layers", "1"], ["--text-trunk-layers", "1"]),
                             "top 2 text layers trained": (["--train-text-layers", "2"], ["--text-trunk-layers", "2"])},
                # issue 23: the image as a grid of decoder tokens (--image-tokens chosen here), LoRA on the decoder
                "emoji": {"media tokens sequence, 4 image tokens (2x2)":
                          (["--task", "generate", "--media-tokens", "sequence", "--image-tokens", "4"],
                           ["--sequence-features"]),
                          "media tokens sequence, 16 image tokens (4x4)":
                          (["--task", "generate", "--media-tokens", "sequence", "--image-tokens", "16"],
                           ["--sequence-features"]),
                          "LoRA rank 8 on the decoder": (["--task", "generate", "--lora-r", "8"], [])},
                # issue 23: the audio as decoder tokens, a fixed count per clip or a rate (--audio-tokens-per-second)
                "prompts": {"media tokens sequence, 16 audio tokens per clip":
                            (["--task", "generate", "--media-tokens", "sequence"], ["--sequence-features"]),
                            "media tokens sequence, 4 audio tokens a second":
                            (["--task", "generate", "--media-tokens", "sequence"],
                             ["--sequence-features", "--audio-tokens-per-second", "4"])}}
EMB = {"text": "text_pooled", "image": "image_emb", "audio": "audio_emb"}  # frozen pooled features


def mmllm(args: list[str], log: Path) -> tuple[dict, float]:
    """Run `mmllm ARGS`: (its JSON result from the last stdout line, wall seconds); stderr goes to `log`."""
    t = time.perf_counter()
    with open(log, "a") as err:
        err.write(f"$ mmllm {' '.join(args)}\n")
        err.flush()
        proc = subprocess.run([mmllm_exe(), *args], stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"mmllm {' '.join(args)} failed ({proc.returncode}); see {log}")
    lines = [line for line in proc.stdout.splitlines() if line.strip().startswith("{")]
    return (json.loads(lines[-1]) if lines else {}), time.perf_counter() - t


def scores(y_true: list, y_pred: list) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0))}


def majority(prepared: Path) -> dict:
    from mmllm.features import load_prepared

    ds, _ = load_prepared(prepared)
    label = Counter(ds["train"]["label"]).most_common(1)[0][0]
    test = ds["test"]["label"]
    return {"label": label, **scores(test, [label] * len(test))}


def features(prepared: Path, modalities: list[str]) -> dict:
    """split -> (X, y): the frozen pooled features of each modality side by side (zeros where missing)."""
    import numpy as np

    from mmllm.features import load_prepared

    ds, _ = load_prepared(prepared)
    out = {}
    for split in ("train", "validation", "test"):
        part = ds[split].with_format("numpy")
        blocks = [np.asarray(part[EMB[m]], dtype=np.float32) for m in modalities]
        out[split] = (np.concatenate(blocks, axis=1), list(ds[split]["label"]))
    return out


def prep_modalities(prepared: Path) -> list[str]:
    from mmllm.features import load_prepared

    return load_prepared(prepared)[1]["modalities"]


def hand_baseline(prepared: Path, modalities: list[str], seed: int = 0, mlp: bool = True) -> dict:
    """Logistic regression and (mlp) a 1-hidden-layer MLP on frozen pooled features; the one best on validation
    accuracy, scored on test (mlp=False: the linear probe)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = features(prepared, modalities)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["validation"], data["test"]
    candidates = [(f"logreg C={c}", LogisticRegression(C=c, max_iter=2000)) for c in (0.01, 0.1, 1.0, 10.0)]
    candidates += [(f"mlp 256 alpha={a}", MLPClassifier((256,), alpha=a, max_iter=300, early_stopping=True,
                                                        random_state=seed)) for a in (1e-4, 1e-2, 1e-1)] if mlp else []
    best = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, clf in candidates:
            model = make_pipeline(StandardScaler(), clf).fit(xtr, ytr)
            val = scores(yva, model.predict(xva))["accuracy"]
            if best is None or val > best[1]:
                best = (name, val, model)
    name, val, model = best
    return {"chosen": name, "val_accuracy": val, **scores(yte, model.predict(xte)), "features": xtr.shape[1]}


def retrieval_baseline(prepared: Path) -> dict:
    """BLEU and chrF of returning, for each test record, the target of its nearest training record by cosine
    similarity of the frozen pooled features (each modality's block L2-normalised, then concatenated)."""
    import numpy as np

    from mmllm.features import load_prepared
    from mmllm.metrics import bleu

    ds, _ = load_prepared(prepared)
    mods = [m for m in prep_modalities(prepared) if EMB.get(m) in ds["train"].column_names]

    def vectors(split: str) -> np.ndarray:
        part = ds[split].with_format("numpy")
        blocks = [np.asarray(part[EMB[m]], dtype=np.float32) for m in mods]
        return np.concatenate([b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-8) for b in blocks], 1)

    nearest = (vectors("test") @ vectors("train").T).argmax(1)
    train_targets = list(ds["train"]["target"])
    hyps = [train_targets[i] for i in nearest]
    m = bleu(hyps, [list(ds["test"]["target"])])
    return {"bleu": m["bleu"], "chrf": m["chrf"], "n": len(hyps), "features": "+".join(mods),
            "bleu_signature": m["bleu_signature"]}


def metrics_of(result: dict) -> dict:
    keys = ("accuracy", "macro_f1", "bleu", "chrf", "n")
    return {k: result[k] for k in keys if k in result}


def train_and_eval(name: str, prepared: Path, work: Path, flags: list[str], log: Path) -> dict:
    """`mmllm finetune PREPARED FLAGS` then `mmllm eval model` on test: metrics, epochs, stop reason, times."""
    ckpt = work / f"ckpt-{name}"
    fit, fit_s = mmllm(["finetune", str(prepared), "--output", str(ckpt), "--overwrite", *flags], log)
    res, eval_s = mmllm(["eval", "model", str(ckpt), str(prepared), "--split", "test", "--no-reliance"], log)
    saved = json.loads((ckpt / "metrics.json").read_text()) if (ckpt / "metrics.json").is_file() else {}
    return {**metrics_of(res), "finetune_s": round(fit_s, 1), "eval_s": round(eval_s, 1),
            "epochs": saved.get("epochs", fit.get("epochs")), "steps": saved.get("steps", fit.get("steps")),
            "stop_reason": saved.get("stop_reason", fit.get("stop_reason")), "flags": flags}


def run_dataset(name: str, work: Path, data: Path, n_train: int, n_eval: int, singles: bool = True) -> dict:
    """All baselines and mmllm's defaults on one dataset (singles=False: without the single-modality runs)."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{name}.log"
    manifest = quality_data.build(name, data, n_train, n_eval)
    prepared = work / f"{name}-prepared"
    prep, prep_s = mmllm(["prepare", str(manifest), "--output", str(prepared), "--overwrite"], log)
    out = {"task": TASKS[name], "counts": prep.get("counts"), "prepare_s": round(prep_s, 1)}
    if TASKS[name] == "generate":
        out["retrieval"] = retrieval_baseline(prepared)
        out["untrained"] = train_and_eval("untrained", prepared, work, ["--task", "generate", "--epochs", "0"], log)
        out["mmllm"] = train_and_eval("defaults", prepared, work, ["--task", "generate"], log)
        if singles:
            out["alternatives"] = alternatives(name, manifest, prepared, work, log)
    else:
        out["majority"] = majority(prepared)
        mods = MODALITIES[name]
        t = time.perf_counter()  # every modality prepared, the transcripts' text model states too
        out["hand_baseline"] = {**hand_baseline(prepared, prep_modalities(prepared)),
                                "fit_s": round(time.perf_counter() - t, 1)}
        out["linear_probe"] = hand_baseline(prepared, prep_modalities(prepared), mlp=False)
        if singles and len(mods) > 1:
            out["single"] = {m: train_and_eval(f"only-{m}", prepared, work, ["--modalities", m], log) for m in mods}
        out["mmllm"] = train_and_eval("defaults", prepared, work, [], log)
        if singles:
            out["alternatives"] = alternatives(name, manifest, prepared, work, log)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {json.dumps(out)}", file=sys.stderr)
    return out


def alternatives(name: str, manifest: Path, prepared: Path, work: Path, log: Path) -> dict:
    """Each of the dataset's ALTERNATIVES to the defaults, trained and scored like them."""
    out = {}
    for i, (variant, (flags, prep_flags)) in enumerate(ALTERNATIVES.get(name, {}).items()):
        data, prep_s = prepared, 0.0
        if prep_flags:
            data = work / f"{name}-prepared-alt{i}"
            _, prep_s = mmllm(["prepare", str(manifest), "--output", str(data), "--overwrite", *prep_flags], log)
        out[variant] = {**train_and_eval(f"alt{i}", data, work, flags, log), "prepare_s": round(prep_s, 1),
                        "prepare_flags": prep_flags}
    return out


def run(names: list[str], work: Path, data: Path = quality_data.DEFAULT_OUT, n_train: int = 1000,
        n_eval: int = 150, singles: bool = True) -> dict:
    results = {"date": datetime.date.today().isoformat(), "versions": versions(), "train": n_train, "eval": n_eval,
               "datasets": {}}
    t = time.perf_counter()
    for name in names:
        results["datasets"][name] = run_dataset(name, work, data, n_train, n_eval, singles)
    results["total_s"] = round(time.perf_counter() - t, 1)
    return results


def best_single(d: dict) -> tuple[str, dict] | None:
    if not d.get("single"):
        return None
    return max(d["single"].items(), key=lambda kv: kv[1].get("accuracy", 0))


def verdict(d: dict) -> dict:
    """The targets for a classification dataset: issue 15's (beats the hand baseline by >= 5 points, above
    majority) and issue 26's (never below the linear probe or the best single modality)."""
    acc = d["mmllm"].get("accuracy", 0.0)
    out = {"beats_hand_by_5": acc >= d["hand_baseline"]["accuracy"] + 0.05,
           "above_majority": acc > d["majority"]["accuracy"] + 0.02}
    if "linear_probe" in d:
        out["at_least_linear_probe"] = acc >= d["linear_probe"]["accuracy"]
    single = best_single(d)
    if single:
        out["at_least_best_single"] = acc >= single[1].get("accuracy", 0.0)
    return out


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def markdown(results: dict) -> str:
    v = results["versions"]
    lines = ["# Quality on real data", "",
             f"Measured {results['date']} on {v['machine']} (torch {v['torch']}, transformers {v['transformers']}), "
             f"{results['train']} training records at most per dataset, {results['total_s']:.0f} s in all. "
             "Regenerate with `make quality` (bench/quality.py; data from bench/quality_data.py). Wall times are "
             "noisy: the 2 cores were shared with other work.", "",
             "| dataset | modalities | majority | best single modality | linear probe (sklearn) | hand baseline "
             "(frozen + sklearn) | mmllm defaults | defaults - hand | epochs, stop | times (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in results["datasets"].items():
        mods = "+".join(MODALITIES[name])
        if d["task"] == "generate":
            u, m, r = d["untrained"], d["mmllm"], d.get("retrieval")
            near = f"; retrieval (nearest training target) BLEU {r['bleu']:.2f} / chrF {r['chrf']:.2f}" if r else ""
            chrf = f" / chrF {m['chrf']:.2f}" if "chrf" in m else ""
            versus = f"{m.get('bleu', 0) - r['bleu']:+.1f} BLEU vs retrieval" if r else "-"
            lines.append(f"| {name} (generate) | {mods} | - | - | - | untrained (zero-shot) BLEU "
                         f"{u.get('bleu', 0):.2f}{near} | BLEU {m.get('bleu', 0):.2f}{chrf} | {versus} | "
                         f"{m['epochs']} ({m.get('steps')} steps), {m['stop_reason']} | prepare "
                         f"{d['prepare_s']}, finetune {m['finetune_s']}, eval {m['eval_s']} |")
            continue
        m, h, maj = d["mmllm"], d["hand_baseline"], d["majority"]
        single = best_single(d)
        single_s = f"{single[0]}: {pct(single[1]['accuracy'])} / {pct(single[1]['macro_f1'])}" if single else \
            "(one modality: = defaults)"
        probe = d.get("linear_probe")
        probe_s = f"{pct(probe['accuracy'])} / {pct(probe['macro_f1'])} ({probe['chosen']})" if probe else "n/a"
        lines.append(f"| {name} | {mods} | {pct(maj['accuracy'])} / {pct(maj['macro_f1'])} | {single_s} | {probe_s} | "
                     f"{pct(h['accuracy'])} / {pct(h['macro_f1'])} ({h['chosen']}) | "
                     f"{pct(m.get('accuracy'))} / {pct(m.get('macro_f1'))} | "
                     f"{100 * (m.get('accuracy', 0) - h['accuracy']):+.1f} | {m['epochs']} ({m.get('steps')} steps), "
                     f"{m['stop_reason']} | "
                     f"prepare {d['prepare_s']}, finetune {m['finetune_s']}, eval {m['eval_s']}, total "
                     f"{d['total_s']} |")
    lines += ["", "Cells are test accuracy / macro-F1 in percent. Targets: mmllm defaults beat the hand baseline by "
              ">= 5 points on every classification dataset and never sit at the majority class (issue 15), and are "
              "never below the linear probe or the best single modality (issue 26).", ""]
    for name, d in results["datasets"].items():
        if d["task"] == "classify":
            lines.append(f"- {name}: " + ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in verdict(d).items()))
    lines += [f"- {name} was rerun alone: {why}" for name, why in results.get("rerun", {}).items()]
    lines += alternatives_markdown(results)
    if NOTES.is_file():
        lines += ["", NOTES.read_text().strip()]
    lines += ["", "Datasets: " + "; ".join(f"**{n}**: {(quality_data.BUILDERS[n].__doc__ or '').strip()}"
                                           for n in results["datasets"]), ""]
    return "\n".join(lines)


def alternatives_markdown(results: dict) -> list[str]:
    """The defaults against their measured alternatives, one row per variant (classification: test accuracy /
    macro-F1; generation: test BLEU / chrF)."""
    rows = [(name, variant, a, d["mmllm"], d["task"] == "generate") for name, d in results["datasets"].items()
            for variant, a in d.get("alternatives", {}).items()]
    if not rows:
        return []
    lines = ["", "Defaults against their alternatives (same data, same run; test accuracy / macro-F1 in percent, or "
             "for generation test BLEU / chrF):", "",
             "| dataset | instead of the default | score | defaults | alternative - defaults | times (s) |",
             "|---|---|---|---|---|---|"]
    for name, variant, a, m, gen in rows:
        if gen:
            score = lambda r: f"BLEU {r.get('bleu', 0):.2f} / chrF {r.get('chrf', 0):.2f}"  # noqa: E731
            diff = f"{a.get('bleu', 0) - m.get('bleu', 0):+.2f} BLEU, {a.get('chrf', 0) - m.get('chrf', 0):+.2f} chrF"
        else:
            score = lambda r: f"{pct(r.get('accuracy'))} / {pct(r.get('macro_f1'))}"  # noqa: E731
            diff = f"{100 * (a.get('accuracy', 0) - m.get('accuracy', 0)):+.1f}"
        lines.append(f"| {name} | {variant} | {score(a)} | {score(m)} | {diff} | prepare {a['prepare_s']}, "
                     f"finetune {a['finetune_s']} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", nargs="*", choices=sorted(TASKS), default=list(TASKS))
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--eval", type=int, default=150)
    ap.add_argument("--out", type=Path, help="write quality.json and QUALITY.md here, not the tracked files")
    ap.add_argument("--data", type=Path, default=quality_data.DEFAULT_OUT, help="manifests (git-ignored)")
    ap.add_argument("--work", type=Path, help="keep prepared data, checkpoints and logs here (default: a temp dir)")
    ap.add_argument("--defaults-only", action="store_true",
                    help="only the baselines and mmllm's defaults: no single-modality runs, no alternatives")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmllm-quality-") as tmp:
        work = args.work or Path(tmp)
        print(f"work folder: {work}", file=sys.stderr)
        results = run(args.dataset, work, args.data, args.train, args.eval, singles=not args.defaults_only)
    publish(results, args.out, (JSON_OUT, MD_OUT), markdown)


if __name__ == "__main__":
    main()
