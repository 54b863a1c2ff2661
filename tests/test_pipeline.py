"""prepare -> finetune -> eval -> predict with tiny random models (fast path)."""

import json

import numpy as np
import pytest

from conftest import load_json_lines, run_cli, tiny_prepare_args, write_image
from mmllm import preparation


def test_prepare_output_folder(prepared):
    import datasets

    meta = json.loads((prepared / "mmllm-prepared.json").read_text())
    for key in ("schema_version", "encoders", "features", "preprocessing", "labels", "counts", "skipped"):
        assert key in meta
    assert meta["labels"] == ["blue-big", "blue-small", "red-big", "red-small"]
    assert sum(meta["counts"].values()) == 48 and set(meta["counts"]) == {"train", "validation", "test"}
    assert meta["encoders"]["image"]["dim"] == 32 and meta["encoders"]["audio"]["preprocessing"]["sample_rate"] == 16000
    ds = datasets.load_from_disk(str(prepared))
    row = ds["train"][0]
    assert len(row["image_emb"]) == 32 and len(row["audio_emb"]) == 32 and row["input_ids"][0] == 2  # [CLS]
    # stratified: every label in every split
    for split in ds:
        assert ds[split].features["label"].names == meta["labels"]  # a ClassLabel of the sorted names
        assert set(ds[split].features["label"].int2str(list(ds[split]["label"]))) == set(meta["labels"])
    assert not list(prepared.parent.glob(".prepared.tmp-*"))


def test_prepare_cache_and_determinism(tiny_models, toy_manifest, tmp_path):
    import datasets

    a, b = tmp_path / "a", tmp_path / "b"
    r1 = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, a))
    r2 = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, b))
    assert r1.exit_code == 0 and r2.exit_code == 0
    assert "53 encoded" in r1.stderr and "0 encoded" in r2.stderr  # 48 images + 5 distinct clips, then cached
    da, db = datasets.load_from_disk(str(a)), datasets.load_from_disk(str(b))
    for split in da:
        assert da[split].data.table.equals(db[split].data.table)
    r3 = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, tmp_path / "c"), "--no-cache")
    assert r3.exit_code == 0 and "53 encoded" in r3.stderr


def test_identical_files_encoded_once(tiny_models, tmp_path):
    for i in range(6):
        write_image(tmp_path / f"same{i}.png", (10, 200, 10))
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"id": i, "image": f"same{i}.png", "label": "g" if i % 2
                                                            else "h"}) for i in range(6)))
    r = run_cli("prepare", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "o"), "--image-model",
                str(tiny_models["image"]))
    assert r.exit_code == 0, r.output
    assert "1 encoded" in r.stderr


def test_bad_records_skipped_and_reported(tiny_models, toy_manifest, tmp_path):
    text = toy_manifest.read_text().splitlines()
    text[1] = text[1].replace("media/img0.png", "media/missing.png")
    (toy_manifest.parent / "media" / "bad.png").write_text("not an image")
    text[2] = text[2].replace("media/img1.png", "media/bad.png")
    toy_manifest.write_text("\n".join(text) + "\n")
    out = tmp_path / "o"
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["skipped"] == 2 and sum(summary["counts"].values()) == 46
    skipped = json.loads((out / "mmllm-prepared.json").read_text())["skipped"]
    assert {(s["id"], s["column"]) for s in skipped} == {("r0", "image"), ("r1", "image")}
    assert "file not found" in skipped[0]["reason"] and "not an image" in skipped[1]["reason"]
    assert "record r0, row 2, column image" in r.stderr
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, tmp_path / "o2"), "--on-error", "fail")
    assert r.exit_code == 2 and "record r0" in r.stderr


def test_shards_and_merge(tiny_models, toy_manifest, tmp_path):
    import datasets

    parts = []
    for i in range(2):
        out = tmp_path / f"shard{i}"
        r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out), "--shard-index", str(i), "--num-shards", "2")
        assert r.exit_code == 0, r.output
        parts.append(out)
    r = run_cli("prepare", *map(str, parts), "--merge", "--output", str(tmp_path / "merged"))
    assert r.exit_code == 0, r.output
    merged = datasets.load_from_disk(str(tmp_path / "merged"))
    whole = tmp_path / "whole"
    assert run_cli(*tiny_prepare_args(tiny_models, toy_manifest, whole)).exit_code == 0
    full = datasets.load_from_disk(str(whole))
    for split in full:
        assert sorted(merged[split]["id"]) == sorted(full[split]["id"])


def test_augment_only_train(tiny_models, toy_manifest, tmp_path):
    import datasets

    out = tmp_path / "aug"
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out), "--augment", "2")
    assert r.exit_code == 0, r.output
    ds = datasets.load_from_disk(str(out))
    n_aug = sum("~aug" in i for i in ds["train"]["id"])
    assert n_aug == 2 * sum("~aug" not in i for i in ds["train"]["id"])
    assert not any("~aug" in i for s in ("validation", "test") for i in ds[s]["id"])
    emb = {i: np.array(e) for i, e in zip(ds["train"]["id"], ds["train"]["image_emb"])}
    some = next(i for i in emb if "~aug" not in i)
    assert not np.allclose(emb[some], emb[f"{some}~aug1"])


def test_prepare_counts_media_features_and_says_what_it_counts(tiny_models, toy_manifest, tmp_path, monkeypatch):
    import hashlib
    import re

    monkeypatch.setenv("MMLLM_HOME", str(tmp_path / "home"))  # an empty feature cache
    media = [p for p in (toy_manifest.parent / "media").iterdir()]
    distinct = len({hashlib.sha256(p.read_bytes()).hexdigest() for p in media})
    assert distinct < len(media) == 96  # the toy audio repeats 5 tones: identical files are encoded once
    for n, (encoded, reused) in enumerate([(distinct, len(media) - distinct), (0, len(media))]):
        r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, tmp_path / f"out{n}"))
        assert r.exit_code == 0, r.output
        assert re.search(rf"(?m)^prepare .* {encoded} encoded, {reused} reused$", r.stderr)  # the progress bar
        assert f"features of each {preparation.counted()}: encoded now, or reused" in r.stderr  # its legend
        line = re.search(r"features: (\d+) encoded, (\d+) reused \(([^)]*)\)", r.stderr)
        assert line and (int(line[1]), int(line[2])) == (encoded, reused), r.stderr
        assert "per image, audio" in line[3] and "and transcript" in line[3] and "feature cache" in line[3]


def test_augment_does_what_its_help_says(monkeypatch):
    """--augment's help is written from config.AUGMENT_IMAGE / AUGMENT_AUDIO; the augmentations read the same
    numbers and stay within them."""
    import dataclasses
    from types import SimpleNamespace

    from PIL import Image, ImageOps

    from mmllm import config as C
    from mmllm.modalities import audio, image

    help_text = next(f for f in dataclasses.fields(C.PrepareConfig) if f.name == "augment").metadata
    for words in ("mirrored left-right with p 0.5", "80%-100% of their area", "+-20%", "+-6 dB", "30 dB SNR",
                  "+-0.1 s", "text unchanged", "validation and test untouched"):
        assert words in help_text["help"], words
    enc = SimpleNamespace(sample_rate=16000)
    t = np.arange(16000) / 16000
    clip = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for seed in range(20):  # the level stays within the stated gain (noise at 30 dB SNR adds 0.1%)
        out = audio.augment_audio(clip, np.random.default_rng(seed), enc.sample_rate)
        gain_db = 20 * np.log10(np.sqrt(np.mean(out ** 2)) / np.sqrt(np.mean(clip ** 2)))
        assert abs(gain_db) <= 6.05
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    monkeypatch.setitem(image.AUGMENT, "flip_p", 1.0)  # the code reads the numbers the help is written from
    monkeypatch.setitem(image.AUGMENT, "min_area", 1.0)
    monkeypatch.setitem(image.AUGMENT, "jitter", 0.0)
    assert np.array_equal(np.asarray(image.augment_image(img, np.random.default_rng(1))),
                          np.asarray(ImageOps.mirror(img)))
    monkeypatch.setitem(audio.AUGMENT, "gain_db", 0.0)
    monkeypatch.setitem(audio.AUGMENT, "snr_db", 300.0)
    monkeypatch.setitem(audio.AUGMENT, "shift_s", 0.0)
    assert np.allclose(audio.augment_audio(clip, np.random.default_rng(1), enc.sample_rate), clip, atol=1e-6)


def finetune(prepared, out, *extra):
    r = run_cli("finetune", str(prepared), "--output", str(out), "--epochs", "3", "--batch-size", "8",
                "--hidden-size", "32", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_finetune_checkpoint_files_and_metrics(prepared, tmp_path):
    out = tmp_path / "ck"
    summary = finetune(prepared, out)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "labels.json", "metrics.jsonl", "metrics.json",
            "finetune_config.json", "training_curves.png", "text_model"} <= files
    assert "resume" not in files
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "mmllm-checkpoint" and cfg["labels"] == json.loads(
        (prepared / "mmllm-prepared.json").read_text())["labels"]
    assert cfg["encoders"]["image"]["identity"].startswith("vit@")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "step" in x and "loss" in x]
    epochs = [x for x in lines if "val_loss" in x]
    assert len(epochs) == 3 and steps and {"ce", "l2", "l1", "lr"} <= set(steps[0])
    assert summary["epochs"] == 3
    r = run_cli("eval", "model", str(out), str(prepared), "--split", "validation", "--no-reliance")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(summary["val_accuracy"])  # the saved model's own
    assert epochs[-1]["epoch"] == 3 and [x["step"] for x in steps] == list(range(1, summary["steps"] + 1))


def test_same_seed_identical_metrics(prepared, tmp_path):
    a = finetune(prepared, tmp_path / "a", "--seed", "3")
    b = finetune(prepared, tmp_path / "b", "--seed", "3")
    assert a["val_loss"] == b["val_loss"] and a["val_accuracy"] == b["val_accuracy"]


def test_l2_penalty_is_logged_and_matches_weights(prepared, tmp_path):
    out = tmp_path / "l2"
    finetune(prepared, out, "--l2", "0.01", "--epochs", "1")
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["l2"] > 0 and abs(first["loss"] - (first["ce"] + first["l2"])) < 1e-4


def test_penalty_counts_only_matrices():
    import torch

    from mmllm.model import penalty

    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
    with torch.no_grad():
        m[0].weight.fill_(2.0)
        m[0].bias.fill_(5.0)
    l2, l1 = penalty(m, 0.5, 0.1)
    assert l2.item() == pytest.approx(0.5 * 6 * 4) and l1.item() == pytest.approx(0.1 * 6 * 2)


def test_early_stopping_restores_best(prepared, tmp_path):
    # no warmup, no minimum step count: the first epoch without improvement stops (once the loss fell)
    summary = finetune(prepared, tmp_path / "es", "--epochs", "30", "--patience", "1", "--min-delta", "10",
                       "--monitor", "val_accuracy", "--warmup-ratio", "0", "--min-steps", "0")
    # stops at the first epoch after the training loss fell below 98% of its start (never before learning)
    assert summary["stopped_early"] and summary["best_epoch"] == 1 and 1 < summary["epochs"] < 30
    assert summary["stop_reason"].startswith(f"stopped early at epoch {summary['epochs']}, "
                                             f"{summary['epochs'] - 1} epochs since the best (epoch 1, val_accuracy")
    assert "no improvement > 10 since (--patience 1)" in summary["stop_reason"]
    curve = [json.loads(line) for line in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in curve if "train_loss" in r]
    assert losses[-1] < 0.98 * losses[0] and all(x >= 0.98 * losses[0] for x in losses[1:-1])
    assert summary["val_accuracy"] == summary["best"]  # the best epoch's weights are restored


@pytest.mark.parametrize("fusion", ["gated", "attention"])
def test_fusions_and_options(prepared, tiny_models, tmp_path, fusion):
    import torch
    from safetensors.torch import load_file

    from mmllm.tasks.classify import auto_class_weights

    out = tmp_path / fusion
    summary = finetune(prepared, out, "--fusion", fusion, "--modality-dropout", "0.2", "--freeze-text",
                       "--class-weights", "auto")
    assert summary["epochs"] == 3
    weights = load_file(str(out / "model.safetensors"))
    original = load_file(str(tiny_models["text"] / "model.safetensors"))
    text = load_file(str(out / "text_model" / "model.safetensors"))  # the text model: a Hugging Face folder
    assert not any(k.startswith("text.") for k in weights) and text.keys() == original.keys()
    for k, v in original.items():  # --freeze-text: the text model is saved exactly as loaded
        assert torch.equal(text[k], v), k
    if fusion == "gated":
        r = run_cli("eval", "model", str(out), str(prepared))
        assert r.exit_code == 0, r.output
        gate = json.loads(r.stdout)["reliance"]["mean_gate"]  # softmax weights per modality, averaged
        assert set(gate) == {"text", "image", "audio"} and sum(gate.values()) == pytest.approx(1, abs=1e-5)
        assert weights["fusion.gate.weight"].shape == (3, 3 * 32) and max(gate.values()) - min(gate.values()) > 1e-4
    else:
        assert weights["fusion.modality_embedding"].abs().sum() > 0  # initialized to zeros, then trained
    # --class-weights auto: inverse class frequency, mean 1
    assert auto_class_weights(torch.tensor([0, 0, 0, 1, -100]), 2).tolist() == pytest.approx([0.5, 1.5])


def test_lora_and_shared_projection(prepared, tiny_models, tmp_path):
    import torch
    from safetensors.torch import load_file

    from mmllm import checkpoint

    summary = finetune(prepared, tmp_path / "lora", "--lora-r", "2", "--share-projections", "--epochs", "1")
    assert summary["epochs"] == 1
    weights = load_file(str(tmp_path / "lora" / "model.safetensors"))
    original = load_file(str(tiny_models["text"] / "model.safetensors"))
    merged = load_file(str(tmp_path / "lora" / "text_model" / "model.safetensors"))  # adapters merged
    assert merged.keys() == original.keys() and not any(k.startswith("text.") for k in weights)
    changed = {k for k, v in original.items() if not torch.equal(merged[k], v)}
    assert any(k.startswith("encoder.layer.") for k in changed)  # adapters start at zero, then trained
    # only the adapted linear weights moved: embeddings, norms, biases and the unused pooler are as loaded
    assert all(k.endswith(".weight") and "LayerNorm" not in k and "embeddings" not in k and "pooler" not in k
               for k in changed), changed
    # --share-projections: one projection for image and audio (same dims), used by both
    assert not any(k.startswith("proj.audio") for k in weights) and any(k.startswith("proj.image") for k in weights)
    model, _, _ = checkpoint.load(tmp_path / "lora")
    assert list(model.proj) == ["text", "image"]
    r = run_cli("eval", "model", str(tmp_path / "lora"), str(prepared))
    assert r.exit_code == 0, r.output


def test_resume_matches_uninterrupted(prepared, tmp_path, monkeypatch):
    import mmllm.loop as ft

    full = finetune(prepared, tmp_path / "full", "--epochs", "4", "--modality-dropout", "0.3")
    original = ft.fit_epoch

    def interrupted_after_two_epochs(*args, **kwargs):
        seen = original(*args, **kwargs)
        state, stop = args[7], args[8]
        if state.epoch == 1:
            stop.hit = True  # what Ctrl-C does: finish the step, save, exit
        return seen

    monkeypatch.setattr(ft, "fit_epoch", interrupted_after_two_epochs)
    part = tmp_path / "part"
    r = run_cli("finetune", str(prepared), "--output", str(part), "--epochs", "4", "--batch-size", "8",
                "--hidden-size", "32", "--modality-dropout", "0.3")
    assert r.exit_code == 130 and (part / "resume" / "state.json").is_file()
    assert "--resume" in r.stderr
    r = run_cli("finetune", str(prepared), "--output", str(part), "--epochs", "4", "--batch-size", "8")
    assert r.exit_code == 2 and "unfinished run" in r.stderr
    monkeypatch.setattr(ft, "fit_epoch", original)
    resumed = finetune(prepared, part, "--epochs", "4", "--modality-dropout", "0.3", "--resume")
    for key in ("val_loss", "val_accuracy", "steps", "best_epoch"):
        assert resumed[key] == full[key], key


def test_eval_and_predict_round_trip(prepared, toy_manifest, tmp_path):
    ck = tmp_path / "ck"
    finetune(prepared, ck, "--epochs", "4")
    out = tmp_path / "m.json"
    r = run_cli("eval", "model", str(ck), str(prepared), "--output", str(out))
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert {"accuracy", "macro_f1", "per_class", "confusion_matrix", "ece", "reliance"} <= set(m)
    assert set(m["reliance"]["masked"]) == {"none", "text", "image", "audio"}
    assert out.is_file() and (tmp_path / "m_confusion.png").is_file()
    assert json.loads((tmp_path / "m.config.json").read_text())["split"] == "test"  # resolved config beside it
    r = run_cli("predict", str(ck), str(toy_manifest), "--output", str(tmp_path / "p.jsonl"))
    assert r.exit_code == 0 and r.stdout == "" and len((tmp_path / "p.jsonl").read_text().splitlines()) == 48
    assert json.loads((tmp_path / "p.config.json").read_text())["top_k"] == 1
    # predict on the raw test records gives the predictions eval scored
    import datasets

    test_ids = set(datasets.load_from_disk(str(prepared))["test"]["id"])
    r = run_cli("predict", str(ck), str(toy_manifest))
    assert r.exit_code == 0, r.output
    preds = {p["id"]: p["prediction"] for p in load_json_lines(r.stdout)}
    gold = {row.split(",")[0]: row.split(",")[4] for row in toy_manifest.read_text().splitlines()[1:]}
    acc = np.mean([preds[i] == gold[i] for i in test_ids])
    assert acc == pytest.approx(m["accuracy"])
    # raw manifest as DATA for eval featurizes on the fly
    r = run_cli("eval", "model", str(ck), str(toy_manifest), "--split", "test", "--no-reliance")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 48


def test_bf16_precision(prepared, tmp_path):
    # one fusion model (--fusion auto could keep a probe, which is fitted in fp32 either way)
    summary = finetune(prepared, tmp_path / "bf16", "--precision", "bf16", "--epochs", "1", "--fusion", "bilinear")
    fp32 = finetune(prepared, tmp_path / "fp32", "--epochs", "1", "--fusion", "bilinear")
    assert summary["val_loss"] != fp32["val_loss"]  # autocast did run in bfloat16 ...
    assert summary["val_loss"] == pytest.approx(fp32["val_loss"], abs=0.05)  # ... and trained the same model


def test_num_workers_gives_identical_output(tiny_models, toy_manifest, tmp_path):
    import datasets

    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(*tiny_prepare_args(tiny_models, toy_manifest, a), "--no-cache").exit_code == 0
    assert run_cli(*tiny_prepare_args(tiny_models, toy_manifest, b), "--no-cache", "--num-workers", "2").exit_code == 0
    da, db = datasets.load_from_disk(str(a)), datasets.load_from_disk(str(b))
    for split in da:
        assert da[split].data.table.equals(db[split].data.table)


def test_class_folder_and_saved_dataset_inputs(tiny_models, tmp_path):
    import datasets

    for cls, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(5):
            write_image(tmp_path / "folder" / cls / f"{i}.png", tuple(max(0, c - 10 * i) for c in color))
    r = run_cli("prepare", str(tmp_path / "folder"), "--output", str(tmp_path / "p1"), "--image-model",
                str(tiny_models["image"]), "--val-fraction", "0.2", "--test-fraction", "0.2")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "p1" / "mmllm-prepared.json").read_text())
    assert meta["labels"] == ["blue", "red"] and meta["modalities"] == ["image"]
    assert meta["counts"] == {"train": 6, "validation": 2, "test": 2}
    from PIL import Image

    ds = datasets.Dataset.from_dict({"text": ["big", "small"] * 3, "label": ["b", "s"] * 3,
                                     "image": [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(6)]},
                                    features=datasets.Features({"text": datasets.Value("string"),
                                                                "label": datasets.Value("string"),
                                                                "image": datasets.Image()}))
    datasets.DatasetDict({"train": ds, "validation": ds, "test": ds}).save_to_disk(str(tmp_path / "hf"))
    r = run_cli("prepare", str(tmp_path / "hf"), "--output", str(tmp_path / "p2"), "--image-model",
                str(tiny_models["image"]), "--text-model", str(tiny_models["text"]))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"] == {"train": 6, "validation": 6, "test": 6}


def test_attention_fusion_over_sequence_features(tiny_models, toy_manifest, tmp_path):
    import datasets

    prepared = tmp_path / "seq"
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, prepared), "--sequence-features")
    assert r.exit_code == 0, r.output
    ds = datasets.load_from_disk(str(prepared))["train"]
    assert np.asarray(ds[0]["image_seq"]).shape == (16, 32) and np.asarray(ds[0]["audio_seq"]).shape == (16, 32)
    ck = tmp_path / "ck"
    finetune(prepared, ck, "--fusion", "attention", "--epochs", "2")
    assert json.loads((ck / "config.json").read_text())["model"]["sequence"] is True
    r = run_cli("eval", "model", str(ck), str(prepared))
    assert r.exit_code == 0, r.output
    r = run_cli("predict", str(ck), str(toy_manifest))
    assert r.exit_code == 0 and len(load_json_lines(r.stdout)) == 48


def test_a_pipe_or_a_broken_link_in_a_class_folder_is_its_own_skip_line(tiny_models, tmp_path):
    """Entries named as media that are not regular files (a named pipe, a link to a device, a broken link) are
    reported as skipped records with their reason, never opened (a pipe would block) and never silently left out."""
    import os

    for cls, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(4):
            write_image(tmp_path / "folder" / cls / f"{i}.png", tuple(max(0, c - 10 * i) for c in color))
    os.mkfifo(tmp_path / "folder" / "red" / "pipe.png")
    (tmp_path / "folder" / "blue" / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "folder" / "blue" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    r = run_cli("prepare", str(tmp_path / "folder"), "--output", str(tmp_path / "p"), "--image-model",
                str(tiny_models["image"]), "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert r.exit_code == 0, r.output
    skipped = {s["id"]: s["reason"] for s in json.loads((tmp_path / "p" / "mmllm-prepared.json").read_text())[
        "skipped"]}
    assert "named pipe" in skipped["red/pipe.png"] and "character device" in skipped["blue/zero.png"]
    assert "broken symlink" in skipped["blue/gone.png"], skipped


def test_merge_refuses_shards_with_targets_or_labels_only_in_one(tiny_models, toy_manifest, tmp_path):
    import csv

    rows = list(csv.DictReader(toy_manifest.open()))
    for name, drop in (("no_target", "target"), ("no_label", "label")):
        with (toy_manifest.parent / f"{name}.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, [k for k in rows[0] if k != drop])
            w.writeheader()
            w.writerows({k: v for k, v in r.items() if k != drop} for r in rows[:12])
    out = {}
    for name in ("manifest", "no_target", "no_label"):
        out[name] = tmp_path / name
        r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest.parent / f"{name}.csv", out[name]))
        assert r.exit_code == 0, r.output
    for other, said in (("no_target", "targets only in the first"), ("no_label", "labels only in the first")):
        r = run_cli("prepare", str(out["manifest"]), str(out[other]), "--merge", "--output", str(tmp_path / "m"))
        assert r.exit_code == 2 and said in r.stderr, r.output
        assert not (tmp_path / "m").exists()
