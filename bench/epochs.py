"""Cached features: an epoch over the prepared features against decoding + encoding the media every epoch; and,
with a frozen text model, an epoch over its pooled states stored by prepare against running it in every step."""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

from common import ROOT, SAMPLE, encoder

MODALITIES = ["text", "image", "audio"]
TARGET = ">= 10x faster, accuracy within 1 point (frozen text model; fine-tuned reported too)"
TEXT_TARGET = ">= 10x faster epochs with the frozen text model's states from prepare than running it, same accuracy"


@dataclasses.dataclass
class Setup:
    train: Any  # FeatureTable
    test: Any
    train_states: Any  # the same splits with the frozen text model's pooled states (text_pooled) from prepare
    test_states: Any
    labels: list[str]
    text: Any  # the text encoder, whose model is trained
    image: Any  # encoders the online baseline runs every epoch
    audio: Any
    rows: dict  # sample_data records by id


def setup(prepared: Path) -> Setup:
    from mmllm.batches import FeatureTable
    from mmllm.features import load_prepared

    data, meta = load_prepared(prepared)
    l2i = {n: i for i, n in enumerate(meta["labels"])}
    precision = meta["preprocessing"].get("precision", "fp32")  # the online baseline encodes as prepare did
    table = {(split, cached): FeatureTable.from_split(data[split], MODALITIES, l2i, 0, cached_text=cached)
             for split in ("train", "test") for cached in (False, True)}
    return Setup(table["train", False], table["test", False], table["train", True], table["test", True], meta["labels"],
                 encoder("text"), encoder("image", precision), encoder("audio", precision),
                 {r["id"]: r for r in csv.DictReader(open(SAMPLE, encoding="utf-8"))})


def make(s: Setup, freeze: bool):
    import torch

    from mmllm.config import FinetuneConfig
    from mmllm.loop import make_optimizer
    from mmllm.model import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(modalities=MODALITIES, num_labels=len(s.labels), text_dim=384,
                      dims={"image": 1280, "audio": 384}, freeze_text=freeze)
    model = build_model(cfg, s.text.build_model())
    return model, make_optimizer(model, FinetuneConfig())


def online_features(s: Setup, ids: list[str]):
    """What a pipeline without a feature cache does each epoch: decode and encode the media. (B, 1280), (B, 384)"""
    from mmllm.media import load_audio, load_image

    pooled_i, _ = s.image.encode([load_image(ROOT / "sample_data" / s.rows[k]["image"]) for k in ids])
    pooled_a, _ = s.audio.encode([load_audio(ROOT / "sample_data" / s.rows[k]["audio"], 16000) for k in ids])
    return pooled_i, pooled_a


def epoch(s: Setup, model, opt, online: bool, seed: int, states: bool = False) -> None:
    import torch

    model.train()
    train = s.train_states if states else s.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    for i in range(0, len(order), 32):
        batch = train.batch(order[i:i + 32])
        if online:
            pooled_i, pooled_a = online_features(s, [s.train.ids[j] for j in order[i:i + 32]])
            batch["image_emb"], batch["audio_emb"] = torch.from_numpy(pooled_i), torch.from_numpy(pooled_a)
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def train_and_test(s: Setup, freeze: bool, online: bool, epochs: int, states: bool = False) -> dict:
    """Median epoch time and the test accuracy after `epochs` epochs (`states`: read the frozen text model's
    pooled states from the prepared data instead of running it)."""
    from mmllm.metrics import classification
    from mmllm.tasks.classify import predict_table

    model, opt = make(s, freeze)
    times = []
    for e in range(epochs):
        t = time.perf_counter()
        epoch(s, model, opt, online, e, states)
        times.append(time.perf_counter() - t)
    probs, gold, _ = predict_table(model, s.test_states if states else s.test, "cpu", 64)
    return {"epoch_s": statistics.median(times),
            "test_accuracy": classification(gold, probs.argmax(1), s.labels)["accuracy"]}


def run(prepared: Path, epochs: int) -> dict:
    """speedup = online epoch_s / cached epoch_s; accuracy_diff = |online - cached| test accuracy."""
    import numpy as np

    s = setup(prepared)
    online = online_features(s, s.train.ids[:32])  # the same features, up to float noise of batching
    diff = max(float(np.abs(x - s.train.emb[role][:32].numpy()).max()) for x, role in zip(online, ("image", "audio")))
    out = {"epochs": epochs, "feature_max_abs_diff": diff}
    for freeze in (True, False):
        res = {"cached": train_and_test(s, freeze, False, epochs), "online": train_and_test(s, freeze, True, epochs)}
        speedup = res["online"]["epoch_s"] / res["cached"]["epoch_s"]
        diff = abs(res["online"]["test_accuracy"] - res["cached"]["test_accuracy"])
        out["frozen_text" if freeze else "finetuned_text"] = {**res, "speedup": speedup, "accuracy_diff": diff}
    running = out["frozen_text"]["cached"]
    states = train_and_test(s, True, False, epochs, states=True)
    out["frozen_text_states"] = {"running": running, "states": states,
                                 "speedup": running["epoch_s"] / states["epoch_s"],
                                 "accuracy_diff": abs(running["test_accuracy"] - states["test_accuracy"]),
                                 "target": TEXT_TARGET}
    best = out["frozen_text"]
    return {**out, "speedup": best["speedup"], "accuracy_diff": best["accuracy_diff"], "target": TARGET,
            "met": best["speedup"] >= 10 and best["accuracy_diff"] <= 0.01}


def report(r: dict) -> tuple[list[str], list[str]]:
    """(table rows, other figures) for BENCHMARKS.md."""
    rows = []
    for variant in ("frozen_text", "finetuned_text"):
        c = r[variant]
        rows.append(f"| epoch over cached features ({variant.replace('_', ' ')}) | {c['cached']['epoch_s']:.2f} s "
                    f"(acc {c['cached']['test_accuracy']:.3f}) | decode+encode every epoch "
                    f"{c['online']['epoch_s']:.2f} s (acc {c['online']['test_accuracy']:.3f}) | {c['speedup']:.1f}x | "
                    f">= 10x, accuracy within 0.01 | {c['speedup'] >= 10 and c['accuracy_diff'] <= 0.01} |")
    t = r.get("frozen_text_states")
    if t:
        rows.append(f"| epoch, frozen text model: its pooled states from prepare | {t['states']['epoch_s']:.2f} s "
                    f"(acc {t['states']['test_accuracy']:.3f}) | text model run every step "
                    f"{t['running']['epoch_s']:.2f} s (acc {t['running']['test_accuracy']:.3f}) | "
                    f"{t['speedup']:.1f}x | "
                    f">= 10x, accuracy within 0.01 | {t['speedup'] >= 10 and t['accuracy_diff'] <= 0.01} |")
    return rows, []
