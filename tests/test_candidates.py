"""--fusion auto: linear probes and fusion models as candidates, one kept on validation (issue 26)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import load_json_lines, run_cli, tiny_prepare_args, write_csv, write_image, write_wav


def finetune(prepared, out, *extra):
    r = run_cli("finetune", str(prepared), "--output", str(out), "--epochs", "3", "--batch-size", "8",
                "--hidden-size", "32", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1]), r


def test_auto_trains_every_candidate_and_keeps_the_best_on_validation(prepared, tmp_path):
    summary, r = finetune(prepared, tmp_path / "ck")
    cands = summary["candidates"]
    assert set(cands) == {"concat", "gated", "bilinear", "linear", "linear_text", "linear_image", "linear_audio"}
    for name, c in cands.items():
        assert {"val_loss", "val_accuracy", "val_f1", "seconds"} <= set(c), name
        assert c["seconds"] >= 0
    assert {c["C"] for n, c in cands.items() if n.startswith("linear")} <= {0.001, 0.01, 0.1, 1.0, 10.0}
    kept = summary["kept"]
    assert cands[kept]["val_loss"] == min(c["val_loss"] for c in cands.values())
    assert summary["val_loss"] == pytest.approx(cands[kept]["val_loss"])  # the summary describes what was kept
    assert f"--fusion auto kept {kept}" in r.stderr
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model"]["fusion"] == ("linear" if kept.startswith("linear") else kept)
    assert config["selection"]["kept"] == kept and set(config["selection"]["candidates"]) == set(cands)
    metrics = json.loads((tmp_path / "ck" / "metrics.json").read_text())
    assert metrics["kept"] == kept
    card = (tmp_path / "ck" / "README.md").read_text()
    assert f"Chosen by `--fusion auto`: {kept}" in card and f"| {kept} (kept) |" in card
    assert all(f"| {name}" in card for name in cands)


@pytest.mark.parametrize("kept", ["linear", "linear_image", "gated"])
def test_each_kind_of_candidate_is_a_real_checkpoint(prepared, toy_manifest, tmp_path, monkeypatch, kept):
    """Whichever candidate wins, predict and eval (with modality reliance) work on the checkpoint, and predict on
    the raw records agrees with eval on the prepared ones."""
    from mmllm.tasks.classify import core as classify

    monkeypatch.setattr(classify, "choose", lambda results, monitor: kept)
    summary, _ = finetune(prepared, tmp_path / "ck")
    assert summary["kept"] == kept
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["model"]["modalities"] == (["image"] if kept == "linear_image" else ["text", "image", "audio"])
    r = run_cli("eval", "model", str(tmp_path / "ck"), str(prepared), "--split", "test")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert set(m["reliance"]["masked"]) == {"none", *config["model"]["modalities"]}
    r = run_cli("predict", str(tmp_path / "ck"), str(toy_manifest))
    assert r.exit_code == 0, r.output
    import datasets

    test = datasets.load_from_disk(str(prepared))["test"]
    preds = {p["id"]: p["prediction"] for p in load_json_lines(r.stdout)}
    gold = dict(zip(test["id"], [test.features["label"].int2str(x) for x in test["label"]]))
    assert np.mean([preds[i] == gold[i] for i in gold]) == pytest.approx(m["accuracy"])


def test_explicit_fusion_reports_the_linear_probe_beside_it(prepared, tmp_path):
    summary, r = finetune(prepared, tmp_path / "ck", "--fusion", "gated")
    assert "candidates" not in summary and "kept" not in summary
    probe = summary["linear_probe"]
    assert {"val_loss", "val_accuracy", "val_f1", "C", "seconds"} <= set(probe)
    assert "linear probe (text, image, audio)" in r.stderr
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["model"]["fusion"] == "gated"


def test_probe_is_scikit_learn_logistic_regression():
    """For one C, the probe's L-BFGS fit gives scikit-learn's LogisticRegression(C) probabilities on the same
    standardized features (objective: C * sum CE + ||W||^2 / 2, intercept not penalized)."""
    from sklearn.linear_model import LogisticRegression

    from mmllm.batches import FeatureTable
    from mmllm.model import ModelConfig
    from mmllm.tasks import candidates

    rng = np.random.default_rng(3)
    n, d = 90, 6
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, d)) + y[:, None] * 0.7
    cols = {"id": [str(i) for i in range(n)], "label": [str(v) for v in y], "has_image": [True] * n,
            "image_emb": x.astype(np.float32)}
    table = FeatureTable(cols, ["image"], {"0": 0, "1": 1, "2": 2})
    cfg = ModelConfig(modalities=["image"], num_labels=3, fusion="linear", dims={"image": d})
    old = candidates.PROBE_C
    candidates.PROBE_C = (0.5,)
    try:
        probe, info = candidates.fit_probe(cfg, None, table, lambda m: {"val_loss": 0.0}, "val_loss", None, "cpu")
    finally:
        candidates.PROBE_C = old
    assert info["C"] == 0.5
    with torch.no_grad():
        feats = probe.features(table.batch(range(n)))
        ours = probe(table.batch(range(n)))["logits"].softmax(-1).numpy()
    ref = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(feats.numpy(), y)
    assert np.abs(ours - ref.predict_proba(feats.numpy())).max() < 1e-3


def test_a_modality_of_pure_noise_does_not_hurt(tiny_models, tmp_path):
    """Image colour decides the label (with overlap); the audio is a random tone, unrelated to it. With the audio,
    --fusion auto's test accuracy is at least its accuracy without it, minus 1 point. (Measured when written:
    auto 0.755 with and without the audio; a lone --fusion bilinear fell from 0.755 to 0.525 with it, concat
    from 0.755 to 0.715.)"""
    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(300):
        label = i % 2
        red = int(np.clip(rng.normal(150 if label else 105, 40), 0, 255))  # overlapping classes
        write_image(media / f"i{i}.png", (red, 60, 255 - red))
        write_wav(media / f"a{i}.wav", freq=float(rng.uniform(200, 2000)))
        split = "train" if i < 60 else "validation" if i < 100 else "test"
        rows.append({"id": f"r{i}", "image": f"media/i{i}.png", "audio": f"media/a{i}.wav",
                     "label": ["blue", "red"][label], "split": split})
    manifest = write_csv(tmp_path / "m.csv", rows)
    prepared = tmp_path / "prep"
    r = run_cli(*tiny_prepare_args(tiny_models, manifest, prepared))
    assert r.exit_code == 0, r.output
    acc = {}
    for name, mods in (("with", "image,audio"), ("without", "image")):
        out = tmp_path / name
        r = run_cli("finetune", str(prepared), "--output", str(out), "--epochs", "20", "--batch-size", "16",
                    "--hidden-size", "32", "--modalities", mods, "--patience", "3", "--min-steps", "0")
        assert r.exit_code == 0, r.output
        r = run_cli("eval", "model", str(out), str(prepared), "--split", "test", "--no-reliance")
        assert r.exit_code == 0, r.output
        acc[name] = json.loads(r.stdout)["accuracy"]
    assert acc["without"] > 0.6  # the image does carry the label
    assert acc["with"] >= acc["without"] - 0.01, acc
