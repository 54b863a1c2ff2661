"""Inputs mmllm does not control: the feature cache on disk, decoded images, plots of many classes, untrusted
checkpoints. Each is checked, bounded or recomputed; none sinks a run (issue 21)."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, write_image


def _image_manifest(tmp_path: Path, n: int = 8) -> Path:
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for i in range(n):
        write_image(media / f"img{i}.png", (20 * i, 255 - 20 * i, 90))
        rows.append({"id": f"r{i}", "image": f"media/img{i}.png", "label": "ab"[i % 2]})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path / "m.jsonl"


def _prepare(models: dict, manifest: Path, out: Path, *extra: str):
    return run_cli("prepare", str(manifest), "--output", str(out), "--image-model", str(models["image"]),
                   "--test-fraction", "0", "--val-fraction", "0", *extra)


def _features(folder: Path) -> dict[str, np.ndarray]:
    import datasets

    ds = datasets.load_from_disk(str(folder))["train"]
    return dict(zip(ds["id"], np.asarray(ds["image_emb"], np.float32)))


def test_garbled_wrong_shape_and_unreadable_cache_entries_are_recomputed(tiny_models, tmp_path, isolated_home):
    from safetensors.numpy import save_file

    from mmllm.features import write_entry

    manifest = _image_manifest(tmp_path)
    assert _prepare(tiny_models, manifest, tmp_path / "first").exit_code == 0
    entries = sorted((isolated_home / "features").rglob("*.safetensors"))
    assert len(entries) == 8
    garbled, wrong_shape, truncated, legacy = entries[:4]
    data = bytearray(garbled.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # safetensors: 8-byte header length, JSON header, tensor bytes
    data[start:start + 16] = bytes(16)  # four float32 values zeroed: the header (and the shape) stay valid
    garbled.write_bytes(bytes(data))
    write_entry(wrong_shape, {"pooled": np.zeros(5, np.float32)})  # a valid checksum over the wrong shape
    truncated.write_bytes(truncated.read_bytes()[:20])
    value = {"pooled": np.full(32, 0.5, np.float32)}
    save_file(value, str(legacy))  # the right shape, no checksum: an entry nothing vouches for

    r = _prepare(tiny_models, manifest, tmp_path / "second")
    assert r.exit_code == 0, r.output
    assert "4 encoded, 4 reused" in r.stderr  # the four bad entries recomputed, the four good ones reused
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line and "cache" in line]
    assert len(warnings) == 1 and "feature cache entry" in warnings[0] and "recomputed" in warnings[0], r.stderr
    assert "Traceback" not in r.stderr and "ArrowInvalid" not in r.stderr
    r = _prepare(tiny_models, manifest, tmp_path / "plain", "--no-cache")
    assert r.exit_code == 0, r.output
    cached, plain = _features(tmp_path / "second"), _features(tmp_path / "plain")
    assert cached.keys() == plain.keys()
    for k in plain:
        np.testing.assert_allclose(cached[k], plain[k], atol=1e-6)
    # the recomputed entries were rewritten whole: a third run reuses all eight, silently
    r = _prepare(tiny_models, manifest, tmp_path / "third")
    assert r.exit_code == 0 and "0 encoded, 8 reused" in r.stderr and "cache entry" not in r.stderr, r.stderr


@pytest.mark.parametrize("failure", ["not_a_folder", "disk_full"])
def test_unwritable_feature_cache_is_a_warning(tiny_models, tmp_path, isolated_home, monkeypatch, failure):
    import safetensors.numpy

    if failure == "not_a_folder":  # tests run as root, where chmod cannot make a folder read-only: mkdir fails
        (isolated_home / "features").write_text("")
    else:
        def full(*_a, **_k):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(safetensors.numpy, "save_file", full)
    r = _prepare(tiny_models, _image_manifest(tmp_path), tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"] == {"train": 8}
    assert len(_features(tmp_path / "out")) == 8
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line and "cache" in line]
    assert len(warnings) == 1 and "cannot write the feature cache" in warnings[0], r.stderr
    if failure == "disk_full":
        assert "No space left on device" in warnings[0]
        assert not list((isolated_home / "features").rglob("*.tmp*"))


# ---------------------------------------------------------------- the model card says only what the config backs


def _card(folder: Path) -> tuple[str, list[str]]:
    import re

    card = (folder / "README.md").read_text(encoding="utf-8")
    command = re.search(r"```bash\n(mmllm finetune .*)\n```", card).group(1).split()
    return card, [w for w in command if w.startswith("--")]


def test_command_line_leaves_out_resolved_defaults(tmp_path):
    import dataclasses

    from mmllm.config import FinetuneConfig, save_resolved
    from mmllm.modelcard import command_line

    save_resolved(FinetuneConfig(prepared="p", output="o"), tmp_path / "finetune_config.json")
    assert command_line(tmp_path / "finetune_config.json") == "mmllm finetune p --output o"
    cfg = dataclasses.replace(FinetuneConfig(prepared="p", output="o", lora_r=4, task="generate"), epochs=7)
    save_resolved(cfg, tmp_path / "finetune_config.json")  # --epochs given (no metrics.json says otherwise)
    assert command_line(tmp_path / "finetune_config.json") == \
        "mmllm finetune p --output o --task generate --lora-r 4 --epochs 7"
    (tmp_path / "metrics.json").write_text(json.dumps({"schedule": {"epochs": 7, "epochs_from": "--budget-steps"}}))
    assert "--epochs" not in command_line(tmp_path / "finetune_config.json")  # the budget chose them


def test_model_card_of_a_frozen_text_checkpoint(trained_checkpoint):
    card, flags = _card(trained_checkpoint)
    metrics = json.loads((trained_checkpoint / "metrics.json").read_text())
    assert "The text model is frozen (not trained)" in card and "pretrained (frozen) text model" in card
    assert "fine-tuned" not in card and "LoRA" not in card and "multimodal classifier" not in card
    assert flags == ["--output", "--hidden-size", "--epochs"], flags  # as given: --epochs 1 --hidden-size 16
    assert f"those of epoch {metrics['best_epoch']}" in card and "final weights" not in card


def test_model_card_of_image_only_and_lora_checkpoints(tiny_models, trained_checkpoint, tmp_path):
    manifest = _image_manifest(tmp_path, 12)
    assert run_cli("prepare", str(manifest), "--output", str(tmp_path / "p"), "--image-model",
                   str(tiny_models["image"]), "--val-fraction", "0.34", "--test-fraction", "0").exit_code == 0
    r = run_cli("finetune", str(tmp_path / "p"), "--output", str(tmp_path / "img"), "--epochs", "3",
                "--hidden-size", "16", "--fusion", "concat")
    assert r.exit_code == 0, r.output
    card, flags = _card(tmp_path / "img")
    assert "text model" not in card and "text_model/" not in card and "LoRA" not in card and "fine-tuned" not in card
    assert "A classifier trained with mmllm (`--task classify`) on image." in card
    assert "The image encoder is frozen and identified by a hash of its weights." in card
    assert flags == ["--output", "--fusion", "--hidden-size", "--epochs"], flags
    best = json.loads((tmp_path / "img" / "metrics.json").read_text())["best_epoch"]
    assert f"those of epoch {best}" in card and "the best by `val_loss`" in card

    r = run_cli("finetune", str(trained_checkpoint.parent / "p"), "--output", str(tmp_path / "lora"), "--epochs", "1",
                "--hidden-size", "16", "--lora-r", "2")
    assert r.exit_code == 0, r.output
    card, flags = _card(tmp_path / "lora")
    assert "The text model is fine-tuned with LoRA (rank 2; only the adapters trained)" in card
    assert "LoRA adapters merged" in card and "frozen (not trained)" not in card
    assert flags == ["--output", "--hidden-size", "--lora-r", "--epochs"], flags  # not --no-freeze-text: implied


# ---------------------------------------------------------------- decoded images: memory bounded per record

MEMORY_PROBE = r'''
import json, resource, sys
from pathlib import Path
from mmllm.config import PrepareConfig
from mmllm.encoders import ImageEncoder
from mmllm.features import FeatureStore, load_record

folder, files = Path(sys.argv[1]), sys.argv[2:]
enc = ImageEncoder(str(folder / "effnet"))  # preprocessing only: the weights are never needed
cfg = PrepareConfig(input=[], output="", cache=False)
store = FeatureStore(False)

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

out = {}
for i, f in enumerate(["warmup.jpg", *files]):
    before = peak_mb()
    item = load_record({"id": f, "row": i, "image": str(folder / f), "audio": None}, {"image": enc}, store, cfg)
    if item["error"] is None:
        img = item["media"]["image"]["decoded"]
        pixels = enc.preprocess([img])
        out[f] = {"error": None, "decoded": list(img.size), "pixels": list(pixels.shape)}
    else:
        out[f] = {"error": item["error"]["reason"], "column": item["error"]["column"]}
    out[f]["peak_mb"] = peak_mb() - before
print(json.dumps(out))
'''


def test_decoded_images_are_bounded_in_memory(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    effnet = tmp_path / "effnet"  # the built-in efficientnet-lite0's preprocessing: short side to 224, centre crop
    effnet.mkdir()
    (effnet / "config.json").write_text(json.dumps({"model_type": "efficientnet-lite", "variant": "efficientnet-lite0",
                                                    "image_size": 224, "hidden_size": 1280}))
    Image.new("RGB", (640, 480), (90, 120, 30)).save(tmp_path / "warmup.jpg")
    Image.new("RGB", (4000, 1), (255, 0, 0)).save(tmp_path / "wide.png")
    assert (tmp_path / "wide.png").stat().st_size < 120  # the 96-byte PNG of the report
    Image.new("RGB", (1, 8000), (0, 255, 0)).save(tmp_path / "tall.png")
    Image.new("RGB", (4000, 3000), (30, 60, 200)).save(tmp_path / "photo.jpg", quality=90)  # a 12-MP photo
    Image.new("RGB", (2000, 40), (9, 9, 9)).save(tmp_path / "strip.png")  # 50:1, the longest kept
    files = ["photo.jpg", "strip.png", "wide.png", "tall.png"]  # ru_maxrss only grows: the cheap ones first
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path), *files], capture_output=True, text=True,
                       timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for f in ("wide.png", "tall.png"):  # that record's error, in one line naming the shape; nothing allocated
        assert out[f]["column"] == "image" and "too elongated" in out[f]["error"], out[f]
        assert ("image 4000x1 " if f == "wide.png" else "image 1x8000 ") in out[f]["error"]
        assert "corrupt" not in out[f]["error"]
    assert out["photo.jpg"]["error"] is None and out["photo.jpg"]["decoded"] == [500, 375]  # JPEG draft at 1/8
    assert out["strip.png"]["decoded"] == [2000, 40] and out["strip.png"]["pixels"] == [1, 3, 224, 224]
    for f in files:  # peak memory of each record over the one before (a full 12-MP decode alone is 36 MB)
        assert out[f]["peak_mb"] < 20, out
